"""Compile, pin, attach, detach and unpin the meshaccel eBPF programs.

Public surface: `load`, `detach`, `uninstall`, `instances`, `pin_dir`. Everything an instance owns
lives under /sys/fs/bpf/meshaccel/<instance>:
  maps      local_endpoints, sock_hash, counters   (reused by a reload: fast-path sockets survive)
  programs  prog_sockops, prog_redir
  link      link_sockops   (the cgroup attachment; unpinning it detaches)
  service LB  maps lb_*, programs prog_lb_<hook>, links link_lb_<hook> (sock_lb.c, one per SOCK_ADDR_HOOKS)
sk_msg is attached to sock_hash itself, so it lives as long as that map.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sockops_bpf import libbpf
from sockops_bpf.cgroup import cgroup2_root, cgroup_path_by_id, check_cgroup
from sockops_bpf.errors import BpfError
from sockops_bpf.headers import find_kernel_headers
from sockops_bpf.layout import SockKey

log = logging.getLogger("meshaccel.loader")

BPFFS = Path(os.environ.get("MESHACCEL_BPFFS", "/sys/fs/bpf"))
SRC_DIR = Path(__file__).resolve().parent
SOURCES = ("sockops.c", "redir.c", "sock_lb.c")
PROGRAMS = {"prog_sockops": "mesh_sockops", "prog_redir": "mesh_redir"}
# sock_lb.c: hook -> (function, enum bpf_attach_type). The attach type is also the program's expected
# attach type at load time (it decides which context fields it may write).
SOCK_ADDR_HOOKS = {
    "connect4": ("lb_connect4", 10),  # BPF_CGROUP_INET4_CONNECT
    "connect6": ("lb_connect6", 11),  # BPF_CGROUP_INET6_CONNECT
    "sendmsg4": ("lb_sendmsg4", 14),  # BPF_CGROUP_UDP4_SENDMSG
    "sendmsg6": ("lb_sendmsg6", 15),  # BPF_CGROUP_UDP6_SENDMSG
    "recvmsg4": ("lb_recvmsg4", 19),  # BPF_CGROUP_UDP4_RECVMSG
    "recvmsg6": ("lb_recvmsg6", 20),  # BPF_CGROUP_UDP6_RECVMSG
    "getpeername4": ("lb_getpeername4", 29),  # BPF_CGROUP_INET4_GETPEERNAME
    "getpeername6": ("lb_getpeername6", 30),  # BPF_CGROUP_INET6_GETPEERNAME
}
PROGRAMS.update({f"prog_lb_{hook}": fn for hook, (fn, _) in SOCK_ADDR_HOOKS.items()})


def pin_root() -> Path:
    return BPFFS / "meshaccel"


def pin_dir(instance: str) -> Path:
    if not instance or "/" in instance or instance.startswith("."):
        raise BpfError(f"bad instance name {instance!r}: use letters, digits, '-' and '_'")
    return pin_root() / instance


@dataclass(frozen=True, slots=True)
class Loaded:
    instance: str
    pin_dir: Path
    cgroup: Path
    compile_seconds: float
    reused_maps: bool


def _preflight() -> None:
    if os.geteuid() != 0:
        raise BpfError("eBPF needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run as root")
    if not os.path.ismount(BPFFS):
        raise BpfError(f"no bpffs at {BPFFS}; mount it: mount -t bpf bpf {BPFFS}")


def _compile(pdir: Path, defines: dict[str, str]) -> tuple[object, dict[str, int], float]:
    os.environ["BCC_KERNEL_SOURCE"] = str(find_kernel_headers())
    try:
        from bcc import BPF
    except ImportError as e:
        raise BpfError("bcc is not importable: install Debian's python3-bpfcc (scripts/setup.sh)") from e
    # One text, header first: bcc rewrites map calls only in the main text, not in #included files.
    text = "\n".join((SRC_DIR / s).read_text() for s in ("maps.h", *SOURCES))
    t0 = time.monotonic()
    try:
        cflags = [f"-I{SRC_DIR}", f'-DPIN_DIR="{pdir}"', *(f"-D{k}={v}" for k, v in defines.items())]
        bpf = BPF(text=text.encode(), cflags=cflags)
    except Exception as e:  # bcc raises a bare Exception; clang's messages went to stderr
        raise BpfError(f"eBPF compile failed ({e}); see the compiler messages above") from e
    fds = {
        "prog_sockops": bpf.load_func(PROGRAMS["prog_sockops"].encode(), BPF.SOCK_OPS).fd,
        "prog_redir": bpf.load_func(PROGRAMS["prog_redir"].encode(), BPF.SK_MSG).fd,
    }
    for hook, (fn, attach_type) in SOCK_ADDR_HOOKS.items():
        fds[f"prog_lb_{hook}"] = bpf.load_func(fn.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=attach_type).fd
    return bpf, fds, time.monotonic() - t0


def _repin(fd: int, path: Path) -> None:
    """Point a pin at a new object: pin under a temporary name, then rename over the old pin."""
    tmp = path.with_name(path.name + "_new")  # bpffs refuses names with dots
    if tmp.exists():
        tmp.unlink()
    libbpf.obj_pin(fd, str(tmp))
    os.rename(tmp, path)


def load(instance: str, cgroup: Path | None = None, defines: dict[str, str] | None = None) -> Loaded:
    """Compile and attach; over an existing pin set, swap programs in place and keep the maps.
    `defines` override compile-time tunables of the C sources (benchmarks compare variants)."""
    _preflight()
    cg = check_cgroup(cgroup) if cgroup else cgroup2_root()
    pdir = pin_dir(instance)
    reused = (pdir / "sock_hash").exists()
    pdir.mkdir(parents=True, exist_ok=True)
    try:
        bpf, fds, secs = _compile(pdir, defines or {})
        for pin, fd in fds.items():
            _repin(fd, pdir / pin)
        # sk_msg on the map: replaces the map's program; sockets already in it keep the one they have.
        sock_hash = libbpf.obj_get(str(pdir / "sock_hash"))
        try:
            libbpf.prog_attach(fds["prog_redir"], sock_hash, libbpf.BPF_SK_MSG_VERDICT)
        finally:
            os.close(sock_hash)
        _attach_cgroup(pdir, fds["prog_sockops"], cg)
        for hook, (_, attach_type) in SOCK_ADDR_HOOKS.items():
            _attach_cgroup(pdir, fds[f"prog_lb_{hook}"], cg, f"link_lb_{hook}", attach_type)
        del bpf  # closes bcc's fds; pins and link keep everything alive
    except BaseException:
        if not reused:
            _remove_pins(pdir)
        raise
    log.info("loaded instance=%s cgroup=%s compile_s=%.2f reused_maps=%s", instance, cg, secs, reused)
    return Loaded(instance, pdir, cg, secs, reused)


def _attach_cgroup(pdir: Path, prog_fd: int, cg: Path, link_name: str = "link_sockops",
                   attach_type: int = libbpf.BPF_CGROUP_SOCK_OPS) -> None:
    link_pin = pdir / link_name
    if link_pin.exists():
        link = libbpf.obj_get(str(link_pin))
        try:
            if cgroup_path_by_id(libbpf.link_info(link).cgroup_id) == cg:
                libbpf.link_update(link, prog_fd)  # atomic swap, no gap
                return
        finally:
            os.close(link)
        link_pin.unlink()  # attached elsewhere before: move it
    cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link = libbpf.link_create(prog_fd, cg_fd, attach_type)
    finally:
        os.close(cg_fd)
    try:
        libbpf.obj_pin(link, str(link_pin))
    finally:
        os.close(link)


def detach(instance: str) -> bool:
    """Stop handling new connections (every cgroup link gone); maps and sockets already spliced stay."""
    pdir = pin_dir(instance)
    found = False
    for link_pin in ("link_sockops", *(f"link_lb_{hook}" for hook in SOCK_ADDR_HOOKS)):
        if (pdir / link_pin).exists():
            (pdir / link_pin).unlink()
            found = True
    return found


def spliced_sockets(instance: str) -> int:
    """Sockets currently in the instance's sock_hash (0 when nothing is pinned)."""
    pin = pin_dir(instance) / "sock_hash"
    if not pin.exists():
        return 0
    fd = libbpf.obj_get(str(pin))
    try:
        return len(libbpf.map_keys(fd, SockKey))
    finally:
        os.close(fd)


def uninstall(instance: str, force: bool = False, drain_seconds: float = 0.0) -> int:
    """Remove every attachment and pin of an instance. Returns the spliced sockets left (0 = removed).

    A socket must not leave sock_hash while its peer may still redirect into it: the kernel drops
    bytes queued on the fast path when the socket's psock goes (a test that forced this lost bytes).
    So uninstall first stops new splicing, waits up to `drain_seconds` for spliced connections to
    close, and keeps the maps pinned while any remain — unless `force`.
    """
    pdir = pin_dir(instance)
    if not pdir.exists():
        return 0
    detach(instance)
    deadline = time.monotonic() + drain_seconds
    left = spliced_sockets(instance)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = spliced_sockets(instance)
    if left and not force:
        log.warning("uninstall deferred instance=%s spliced_sockets=%d", instance, left)
        return left
    _remove_pins(pdir)
    return 0


def _remove_pins(pdir: Path) -> None:
    if (pdir / "sock_hash").exists() and (pdir / "prog_redir").exists():
        try:
            m = libbpf.obj_get(str(pdir / "sock_hash"))
            p = libbpf.obj_get(str(pdir / "prog_redir"))
            try:
                libbpf.prog_detach(p, m, libbpf.BPF_SK_MSG_VERDICT)
            finally:
                os.close(m)
                os.close(p)
        except OSError as e:
            log.warning("detach sk_msg instance_dir=%s error=%s", pdir, e)
    shutil.rmtree(pdir, ignore_errors=True)  # unlink on bpffs = unpin
    with contextlib.suppress(OSError):
        pin_root().rmdir()  # fails while other instances remain


def instances() -> list[str]:
    root = pin_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
