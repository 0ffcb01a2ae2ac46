"""Compile, pin, attach, detach and unpin the meshaccel eBPF programs.

Public surface: `load`, `detach`, `uninstall`, `instances`, `pin_dir`, `HOOKS`. Everything an instance
owns lives under /sys/fs/bpf/meshaccel/<instance>:
  maps      every BPF_TABLE_PINNED of maps.h (reused by a reload: fast-path sockets and services survive)
  programs  prog_<hook> for each cgroup hook in HOOKS, and prog_redir (sk_msg)
  links     link_<hook>: the cgroup attachments (unpinning one detaches it)
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
from sockops_bpf.layout import MAPS, MIGRATIONS, SockKey, layout_version, pin_name

log = logging.getLogger("meshaccel.loader")

BPFFS = Path(os.environ.get("MESHACCEL_BPFFS", "/sys/fs/bpf"))
SRC_DIR = Path(__file__).resolve().parent
SOURCES = ("sockops.c", "redir.c", "sock_lb.c", "getsockopt.c", "ingress.c")

# bcc program types (enum bpf_prog_type)
_SOCK_OPS, _CGROUP_SKB, _CGROUP_SOCK_ADDR, _CGROUP_SOCKOPT = 13, 8, 18, 25


@dataclass(frozen=True, slots=True)
class Hook:
    function: str  # in the C sources
    prog_type: int
    attach_type: int  # enum bpf_attach_type; also the program's expected attach type at load time

    @property
    def kind(self) -> str:
        return {3: "cgroup_sock_ops", 0: "cgroup_skb_ingress", 21: "cgroup_getsockopt"}.get(self.attach_type, "")


# Every cgroup attachment, by the name of its pins (prog_<name>, link_<name>). The names of the first
# ones are those of instances pinned by earlier versions, so an upgrade swaps them in place.
HOOKS: dict[str, Hook] = {
    "sockops": Hook("mesh_sockops", _SOCK_OPS, 3),  # BPF_CGROUP_SOCK_OPS
    "lb_connect4": Hook("lb_connect4", _CGROUP_SOCK_ADDR, 10),  # BPF_CGROUP_INET4_CONNECT
    "lb_connect6": Hook("lb_connect6", _CGROUP_SOCK_ADDR, 11),  # BPF_CGROUP_INET6_CONNECT
    "lb_sendmsg4": Hook("lb_sendmsg4", _CGROUP_SOCK_ADDR, 14),  # BPF_CGROUP_UDP4_SENDMSG
    "lb_sendmsg6": Hook("lb_sendmsg6", _CGROUP_SOCK_ADDR, 15),  # BPF_CGROUP_UDP6_SENDMSG
    "lb_recvmsg4": Hook("lb_recvmsg4", _CGROUP_SOCK_ADDR, 19),  # BPF_CGROUP_UDP4_RECVMSG
    "lb_recvmsg6": Hook("lb_recvmsg6", _CGROUP_SOCK_ADDR, 20),  # BPF_CGROUP_UDP6_RECVMSG
    "lb_getpeername4": Hook("lb_getpeername4", _CGROUP_SOCK_ADDR, 29),  # BPF_CGROUP_INET4_GETPEERNAME
    "lb_getpeername6": Hook("lb_getpeername6", _CGROUP_SOCK_ADDR, 30),  # BPF_CGROUP_INET6_GETPEERNAME
    "getsockopt": Hook("mesh_getsockopt", _CGROUP_SOCKOPT, 21),  # BPF_CGROUP_GETSOCKOPT
    "ingress": Hook("mesh_ingress", _CGROUP_SKB, 0),  # BPF_CGROUP_INET_INGRESS
}
SOCK_ADDR_HOOKS = {name.removeprefix("lb_"): h for name, h in HOOKS.items() if h.prog_type == _CGROUP_SOCK_ADDR}


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


def _compile(pdir: Path, defines: dict[str, str], src_dir: Path = SRC_DIR) -> tuple[object, dict[str, int], float]:
    os.environ["BCC_KERNEL_SOURCE"] = str(find_kernel_headers())
    try:
        from bcc import BPF
    except ImportError as e:
        raise BpfError("bcc is not importable: install Debian's python3-bpfcc (scripts/setup.sh)") from e
    # One text, header first: bcc rewrites map calls only in the main text, not in #included files.
    text = "\n".join((src_dir / s).read_text() for s in ("maps.h", *SOURCES) if (src_dir / s).exists())
    t0 = time.monotonic()
    try:
        cflags = [f"-I{src_dir}", f'-DPIN_DIR="{pdir}"', *(f"-D{k}={v}" for k, v in defines.items())]
        bpf = BPF(text=text.encode(), cflags=cflags)
    except Exception as e:  # bcc raises a bare Exception; clang's messages went to stderr
        raise BpfError(f"eBPF compile failed ({e}); see the compiler messages above") from e
    fds = {"prog_redir": bpf.load_func(b"mesh_redir", BPF.SK_MSG).fd}
    for name, hook in HOOKS.items():
        fds[f"prog_{name}"] = bpf.load_func(hook.function.encode(), hook.prog_type, attach_type=hook.attach_type).fd
    return bpf, fds, time.monotonic() - t0


def _repin(fd: int, path: Path) -> None:
    """Point a pin at a new object: pin under a temporary name, then rename over the old pin."""
    tmp = path.with_name(path.name + "_new")  # bpffs refuses names with dots
    if tmp.exists():
        tmp.unlink()
    libbpf.obj_pin(fd, str(tmp))
    os.rename(tmp, path)


def load(instance: str, cgroup: Path | None = None, defines: dict[str, str] | None = None,
         src_dir: Path = SRC_DIR) -> Loaded:
    """Compile and attach; over an existing pin set, swap programs in place and keep the maps (moving the
    entries of a map whose layout changed: `_migrate`). `defines` override compile-time tunables of the C
    sources (benchmarks compare variants); `src_dir` is where they are (tests load an older version)."""
    _preflight()
    cg = check_cgroup(cgroup) if cgroup else cgroup2_root()
    pdir = pin_dir(instance)
    reused = (pdir / "sock_hash").exists()
    pdir.mkdir(parents=True, exist_ok=True)
    try:
        bpf, fds, secs = _compile(pdir, defines or {}, src_dir)
        old_layouts = _migrate(pdir)  # before the new programs look at the new maps
        for pin, fd in fds.items():
            _repin(fd, pdir / pin)
        # sk_msg on the map: replaces the map's program; sockets already in it keep the one they have.
        sock_hash = libbpf.obj_get(str(pdir / "sock_hash"))
        try:
            libbpf.prog_attach(fds["prog_redir"], sock_hash, libbpf.BPF_SK_MSG_VERDICT)
        finally:
            os.close(sock_hash)
        for name, hook in HOOKS.items():
            _attach_cgroup(pdir, fds[f"prog_{name}"], cg, f"link_{name}", hook.attach_type)
        del bpf  # closes bcc's fds; pins and link keep everything alive
        for old in old_layouts:  # the old programs are gone from the hooks: nothing reads these now
            old.unlink()
    except BaseException:
        if not reused:
            _remove_pins(pdir)
        raise
    log.info("loaded instance=%s cgroup=%s compile_s=%.2f reused_maps=%s", instance, cg, secs, reused)
    return Loaded(instance, pdir, cg, secs, reused)


def _migrate(pdir: Path) -> list[Path]:
    """Copy the entries of maps pinned in an older layout into the current layout's maps (just created by
    the compile); the old pins to remove once the new programs are attached. Maps whose entries user space
    cannot copy (sockets) are never versioned (layout.py); an old layout without a migration is dropped."""
    done = []
    for name in MAPS:
        current = layout_version(name)
        for v in range(1, current):
            old = pdir / pin_name(name, v)
            if not old.exists() or not (pdir / pin_name(name)).exists():
                continue  # nothing to move, or sources older than this layout table compiled (tests)
            migration = MIGRATIONS.get((name, v))
            moved = dropped = 0
            if migration is not None:
                src = libbpf.obj_get(str(old))
                dst = libbpf.obj_get(str(pdir / pin_name(name)))
                try:
                    for k in libbpf.map_keys(src, migration.key):
                        value = migration.value()
                        if not libbpf.map_lookup(src, k, value):
                            continue  # gone meanwhile
                        new = migration.convert(k, value)
                        if new is None:
                            dropped += 1
                            continue
                        libbpf.map_update(dst, *new)
                        moved += 1
                finally:
                    os.close(src)
                    os.close(dst)
            log.info("event=layout_migrated map=%s from=%d to=%d moved=%d dropped=%d%s", name, v, current, moved,
                     dropped, "" if migration else " note=no_migration_entries_dropped")
            done.append(old)
    return done


def layouts(instance: str) -> dict[str, dict[str, object]]:
    """For `accel status`: every map's layout version, and pins of older layouts still there."""
    pdir = pin_dir(instance)
    out: dict[str, dict[str, object]] = {}
    for name in MAPS:
        v = layout_version(name)
        older = [k for k in range(1, v) if (pdir / pin_name(name, k)).exists()]
        out[name] = {"version": v, "pinned": (pdir / pin_name(name)).exists(), "older_pinned": older}
    return out


def _attach_cgroup(pdir: Path, prog_fd: int, cg: Path, link_name: str, attach_type: int) -> None:
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
    for link_pin in (f"link_{name}" for name in HOOKS):
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
