"""The lab: a simulated node on this host. Each pod is a network namespace with a veth into the
node's bridge (the bridge lives in a node namespace of its own, so the host's network is never
touched) and a cgroup of its own under the node's cgroup, where the eBPF programs attach.

Everything carries the prefix `meshaccel-<id>` (namespaces, cgroups; pins: `lab-<id>`), is recorded
in /run/meshaccel/lab/<id>.json, and is removed by `down()`, or by `down_all()` after a crash.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accel.errors import UserError
from sockops_bpf import loader
from sockops_bpf.cgroup import cgroup2_root
from sockops_bpf.errors import BpfError
from sockops_bpf.maps import open_pinned

log = logging.getLogger("meshaccel.lab")

STATE_DIR = Path(os.environ.get("MESHACCEL_RUN", "/run/meshaccel")) / "lab"
PREFIX = "meshaccel-"
MAX_PODS = 250
V4_NET = ipaddress.ip_network("10.211.0.0/16")
V6_NET = ipaddress.ip_network("fd00:211::/64")


@dataclass(frozen=True, slots=True)
class LabPod:
    name: str
    uid: str  # as a Pod's metadata.uid; the cgroup is named pod<uid>, as the kubelet names it
    netns: str
    cgroup: str
    ipv4: str
    ipv6: str


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def _ip_batch(netns: str | None, lines: list[str]) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    p = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ip -batch: {p.stderr.strip()}")


class Lab:
    """One simulated node. Use as a context manager, or `up()` / `down()`."""

    def __init__(self, pods: int, lab_id: str | None = None, attach: bool = True, loopback: bool = True) -> None:
        if not isinstance(pods, int) or pods < 1:
            raise UserError(f"--pods must be at least 1 (got {pods})")
        if pods > MAX_PODS:
            raise UserError(f"--pods must be at most {MAX_PODS} (got {pods})")
        self.id = lab_id or secrets.token_hex(3)
        self.attach = attach
        self.loopback = loopback
        self.node_netns = f"{PREFIX}{self.id}-node"
        self.cgroup = cgroup2_root() / f"{PREFIX}lab-{self.id}"
        self.instance = f"lab-{self.id}"
        self.pods: dict[str, LabPod] = {}
        for i in range(pods):
            name = f"pod{i + 1}"
            uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"meshaccel-lab/{self.id}/{name}"))
            self.pods[name] = LabPod(
                name=name,
                uid=uid,
                netns=f"{PREFIX}{self.id}-{name}",
                cgroup=str(self.cgroup / f"pod{uid}"),
                ipv4=str(V4_NET.network_address + 10 + i),
                ipv6=str(V6_NET.network_address + 10 + i),
            )

    # ---- life cycle -------------------------------------------------------------------------
    def up(self) -> Lab:
        _preflight()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._save()  # first, so a crash half-way is still found by down_all()
        try:
            self._build_network()
            self._build_cgroups()
            if self.attach:
                self.attach_bpf()
        except BaseException:
            self.down()
            raise
        log.info("lab up id=%s pods=%d attach=%s", self.id, len(self.pods), self.attach)
        return self

    def _build_network(self) -> None:
        node = self.node_netns
        for ns in (node, *(p.netns for p in self.pods.values())):
            _run("ip", "netns", "add", ns)
        root_lines, node_lines = [], ["link set lo up", "link add br0 type bridge", "link set br0 up",
                                      # the node's own address: host-network processes reach pods from it
                                      f"addr add {self.node_ipv4}/{V4_NET.prefixlen} dev br0",
                                      f"addr add {self.node_ipv6}/{V6_NET.prefixlen} dev br0 nodad"]
        for i, pod in enumerate(self.pods.values()):
            peer = f"v{i + 1}"  # names are per namespace: no clash with other labs or the host
            root_lines.append(f"link add eth0 netns {pod.netns} type veth peer name {peer} netns {node}")
            node_lines.append(f"link set {peer} master br0 up")
        _ip_batch(None, root_lines)
        _ip_batch(node, node_lines)
        for pod in self.pods.values():
            _ip_batch(pod.netns, [
                "link set lo up",
                f"addr add {pod.ipv4}/{V4_NET.prefixlen} dev eth0",
                f"addr add {pod.ipv6}/{V6_NET.prefixlen} dev eth0 nodad",
                "link set eth0 up",
            ])

    def _build_cgroups(self) -> None:
        self.cgroup.mkdir(exist_ok=True)
        for pod in self.pods.values():
            Path(pod.cgroup).mkdir(exist_ok=True)

    def attach_bpf(self, defines: dict[str, str] | None = None) -> None:
        """Load the programs at the node cgroup and register every pod (and loopback) as local."""
        loader.load(self.instance, self.cgroup, defines)
        self.attach = True
        with open_pinned(loader.pin_dir(self.instance)) as maps:
            for i, pod in enumerate(self.pods.values()):
                maps.local_endpoints[pod.ipv4] = i + 1
                maps.local_endpoints[pod.ipv6] = i + 1
            if self.loopback:
                maps.local_endpoints["127.0.0.1"] = 0
                maps.local_endpoints["::1"] = 0

    def detach_bpf(self, force: bool = True) -> int:
        """Remove the programs and pins (for tests and benchmarks: force, the lab owns every socket)."""
        left = loader.uninstall(self.instance, force=force, drain_seconds=2.0)
        self.attach = left > 0
        return left

    def down(self) -> None:
        _teardown(self.id)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---- using it ---------------------------------------------------------------------------
    def pod(self, name: str) -> LabPod:
        try:
            return self.pods[name]
        except KeyError:
            raise UserError(f"no pod {name!r} in lab {self.id}; pods: {', '.join(self.pods)}") from None

    @property
    def node_ipv4(self) -> str:
        return str(V4_NET.network_address + 1)

    @property
    def node_ipv6(self) -> str:
        return str(V6_NET.network_address + 1)

    def node_command(self, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run as a host-network process: the node's namespace and the node cgroup itself."""
        enter = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.node_netns}", "--", "sh", "-c", enter, str(self.cgroup), *argv]

    def command(self, pod: str, argv: Sequence[str], in_cgroup: bool = True) -> list[str]:
        """argv wrapped to run inside the pod: its network namespace and its cgroup. in_cgroup=False
        keeps the caller's cgroup: a process the node's programs do not see (an unmanaged peer)."""
        p = self.pod(pod)
        enter = 'echo $$ > "$0/cgroup.procs" && exec "$@"' if in_cgroup else 'exec "$@"'
        return ["nsenter", f"--net=/run/netns/{p.netns}", "--", "sh", "-c", enter, p.cgroup, *argv]

    def popen(self, pod: str, argv: Sequence[str], in_cgroup: bool = True, **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(pod, argv, in_cgroup), **kw)

    def run(self, pod: str, argv: Sequence[str], in_cgroup: bool = True, **kw: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.command(pod, argv, in_cgroup), **kw)

    def _save(self) -> None:
        doc = {
            "id": self.id,
            "node_netns": self.node_netns,
            "cgroup": str(self.cgroup),
            "instance": self.instance,
            "attach": self.attach,
            "created": time.time(),
            "pods": [asdict(p) for p in self.pods.values()],
        }
        (STATE_DIR / f"{self.id}.json").write_text(json.dumps(doc, indent=1))

    @classmethod
    def load_state(cls, lab_id: str) -> Lab:
        try:
            doc = json.loads((STATE_DIR / f"{lab_id}.json").read_text())
        except FileNotFoundError:
            raise UserError(f"no lab {lab_id!r} is up; `accel lab list` shows the labs") from None
        lab = cls(len(doc["pods"]), lab_id=doc["id"], attach=doc["attach"])
        lab.pods = {p["name"]: LabPod(**p) for p in doc["pods"]}
        return lab


def _preflight() -> None:
    if os.geteuid() != 0:
        raise UserError("the lab needs root (network namespaces, cgroups, eBPF); run it as root")
    for tool in ("ip", "nsenter"):
        if not shutil.which(tool):
            raise UserError(f"`{tool}` is not installed; run scripts/setup.sh (iproute2, util-linux)")


def list_labs() -> list[str]:
    return sorted(p.stem for p in STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []


def _kill_cgroup(cg: Path) -> None:
    """Kill every process in a cgroup subtree and remove the cgroups, leaves first."""
    if not cg.is_dir():
        return
    kill = cg / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
    else:  # kernels before 5.14
        for procs in cg.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    dirs = sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for d in [*dirs, cg]:
        for _ in range(50):  # killed tasks take a moment to leave
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
        else:
            log.warning("cgroup not removed path=%s", d)


def _teardown(lab_id: str) -> None:
    """Remove one lab's resources; tolerant of anything already gone."""
    _kill_cgroup(cgroup2_root() / f"{PREFIX}lab-{lab_id}")
    try:
        # Every process of the lab is gone, so its spliced sockets are closing: let them drain.
        loader.uninstall(f"lab-{lab_id}", force=True, drain_seconds=2.0)
    except (OSError, UserError, BpfError) as e:
        log.warning("unpin lab=%s error=%s", lab_id, e)
    for ns in _netns_names(f"{PREFIX}{lab_id}-"):
        _run("ip", "netns", "del", ns, check=False)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{lab_id}.json").unlink()
    log.info("lab down id=%s", lab_id)


def _netns_names(prefix: str) -> list[str]:
    d = Path("/run/netns")
    return sorted(p.name for p in d.iterdir() if p.name.startswith(prefix)) if d.is_dir() else []


def down_all() -> list[str]:
    """Remove every lab on this host, including what a crashed run left without a state file."""
    ids = set(list_labs())
    ids |= {n[len(PREFIX) :].split("-", 1)[0] for n in _netns_names(PREFIX)}
    root = cgroup2_root()
    ids |= {p.name[len(PREFIX) + 4 :] for p in root.glob(f"{PREFIX}lab-*")}
    ids |= {i[4:] for i in loader.instances() if i.startswith("lab-")}
    for lab_id in sorted(ids):
        _teardown(lab_id)
    return sorted(ids)
