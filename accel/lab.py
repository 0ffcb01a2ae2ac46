"""The lab: simulated nodes on this host. Each pod is a network namespace with a veth into its node's
bridge (the bridge lives in a node namespace of its own, so the host's network is never touched), a
cgroup of its own under the node's cgroup (where that node's eBPF programs attach) and a sandbox
process (`sleep infinity`, as the pause container holds a pod's namespace on a real node).

With several nodes, each has its own namespace, bridge, cgroup subtree and pin instance, and the node
namespaces are joined by a routed link: a veth from each node into a `fabric` namespace whose bridge
plays the network between nodes. Node k's pods are 10.211.(k-1).0/24 and fd00:211:0:(k-1)::/64; the
node itself is .1 of its subnet (its pods' gateway) and 10.211.254.k / fd00:211:0:fe::k on the fabric.

Everything carries the prefix `meshaccel-<id>` (namespaces, cgroups; pins: `lab-<id>`, and
`lab-<id>-node<k>` for the nodes after the first), is recorded in /run/meshaccel/lab/<id>.json, and
is removed by `down()`, or by `down_all()` after a crash.
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
from accel.splice_guard import SpliceGuard
from accel.state.identity import SECURITY_MIN
from sockops_bpf import loader
from sockops_bpf.cgroup import cgroup2_root
from sockops_bpf.errors import BpfError
from sockops_bpf.maps import PinnedMaps, open_pinned

log = logging.getLogger("meshaccel.lab")

STATE_DIR = Path(os.environ.get("MESHACCEL_RUN", "/run/meshaccel")) / "lab"
PREFIX = "meshaccel-"
MAX_PODS = 240  # per node: .10 to .249 of its /24
MAX_NODES = 8
V4_NET = ipaddress.ip_network("10.211.0.0/16")  # every pod of the lab
V6_NET = ipaddress.ip_network("fd00:211::/48")
FABRIC_V4 = ipaddress.ip_network("10.211.254.0/24")
FABRIC_V6 = ipaddress.ip_network("fd00:211:0:fe::/64")


@dataclass(frozen=True, slots=True)
class LabNode:
    name: str  # node1, node2, ...
    netns: str
    cgroup: str  # the node's cgroup: its programs attach here, its pods' cgroups are below
    instance: str  # its pin folder under /sys/fs/bpf/meshaccel
    ipv4: str  # the node's address on its bridge: its pods' gateway, where host-network processes speak from
    ipv6: str
    subnet4: str
    subnet6: str
    fabric4: str  # its address on the link between nodes ("" with one node)
    fabric6: str


@dataclass(frozen=True, slots=True)
class LabPod:
    name: str
    uid: str  # as a Pod's metadata.uid; the cgroup is named pod<uid>, as the kubelet names it
    netns: str
    cgroup: str
    ipv4: str
    ipv6: str
    node: str = "node1"


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


def _node_layout(lab_id: str, nodes: int) -> dict[str, LabNode]:
    root = cgroup2_root() / f"{PREFIX}lab-{lab_id}"
    out = {}
    for k in range(1, nodes + 1):
        sub4 = ipaddress.ip_network(f"10.211.{k - 1}.0/24")
        sub6 = ipaddress.ip_network(f"fd00:211:0:{k - 1:x}::/64")
        name = f"node{k}"
        out[name] = LabNode(
            name=name,
            # one node keeps the layout of one-node labs: its cgroup is the lab's, its pins `lab-<id>`
            netns=f"{PREFIX}{lab_id}-node" if k == 1 else f"{PREFIX}{lab_id}-{name}",
            cgroup=str(root if nodes == 1 else root / name),
            instance=f"lab-{lab_id}" if k == 1 else f"lab-{lab_id}-{name}",
            ipv4=str(sub4.network_address + 1), ipv6=str(sub6.network_address + 1),
            subnet4=str(sub4), subnet6=str(sub6),
            fabric4=str(FABRIC_V4.network_address + k) if nodes > 1 else "",
            fabric6=str(FABRIC_V6.network_address + k) if nodes > 1 else "",
        )
    return out


class Lab:
    """Simulated node(s). Use as a context manager, or `up()` / `down()`. Pods are spread over the nodes
    in turn (pod1 on node1, pod2 on node2, ...)."""

    def __init__(self, pods: int, lab_id: str | None = None, attach: bool = True, loopback: bool = True,
                 nodes: int = 1, sandboxes: bool = True, guard: bool = True) -> None:
        if not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
            raise UserError(f"--nodes must be between 1 and {MAX_NODES} (got {nodes})")
        if not isinstance(pods, int) or pods < 1:
            raise UserError(f"--pods must be at least 1 (got {pods})")
        if pods > MAX_PODS * nodes:
            raise UserError(f"--pods must be at most {MAX_PODS} per node, {MAX_PODS * nodes} in all (got {pods})")
        self.id = lab_id or secrets.token_hex(3)
        self.attach = attach
        self.loopback = loopback
        self.sandboxes = sandboxes  # False: pods start with no process (as before their sandbox runs)
        self.guard = guard  # run the splice guard in this process while the object lives (guard_splices)
        self._guard: SpliceGuard | None = None
        self._guard_maps: list[PinnedMaps] = []
        self.root_cgroup = cgroup2_root() / f"{PREFIX}lab-{self.id}"
        self.nodes = _node_layout(self.id, nodes)
        self.pods: dict[str, LabPod] = {}
        for i in range(pods):
            name = f"pod{i + 1}"
            node = self.nodes[f"node{i % nodes + 1}"]
            j = i // nodes  # index of the pod on its node
            uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"meshaccel-lab/{self.id}/{name}"))
            self.pods[name] = LabPod(
                name=name,
                uid=uid,
                netns=f"{PREFIX}{self.id}-{name}",
                cgroup=str(Path(node.cgroup) / f"pod{uid}"),
                ipv4=str(ipaddress.ip_network(node.subnet4).network_address + 10 + j),
                ipv6=str(ipaddress.ip_network(node.subnet6).network_address + 10 + j),
                node=node.name,
            )

    # ---- the first node, as one-node labs (and their users) know it -------------------------------
    @property
    def first(self) -> LabNode:
        return self.nodes["node1"]

    @property
    def node_netns(self) -> str:
        return self.first.netns

    @property
    def cgroup(self) -> Path:
        return Path(self.first.cgroup)

    @property
    def instance(self) -> str:
        return self.first.instance

    @property
    def node_ipv4(self) -> str:
        return self.first.ipv4

    @property
    def node_ipv6(self) -> str:
        return self.first.ipv6

    # ---- life cycle -------------------------------------------------------------------------
    def up(self) -> Lab:
        _preflight()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._save()  # first, so a crash half-way is still found by down_all()
        try:
            self._build_network()
            self._build_cgroups()
            if self.sandboxes:
                self._start_sandboxes()
            if self.attach:
                self.attach_bpf()
        except BaseException:
            self.down()
            raise
        log.info("lab up id=%s nodes=%d pods=%d attach=%s", self.id, len(self.nodes), len(self.pods), self.attach)
        return self

    def _build_network(self) -> None:
        for ns in (*(n.netns for n in self.nodes.values()), *(p.netns for p in self.pods.values())):
            _run("ip", "netns", "add", ns)
        root_lines: list[str] = []
        node_lines: dict[str, list[str]] = {}
        for node in self.nodes.values():
            node_lines[node.name] = [
                "link set lo up", "link add br0 type bridge", "link set br0 up",
                f"addr add {node.ipv4}/24 dev br0", f"addr add {node.ipv6}/64 dev br0 nodad"]
        for i, pod in enumerate(self.pods.values()):
            node = self.nodes[pod.node]
            peer = f"v{i + 1}"  # names are per namespace: no clash with other labs or the host
            root_lines.append(f"link add eth0 netns {pod.netns} type veth peer name {peer} netns {node.netns}")
            node_lines[node.name].append(f"link set {peer} master br0 up")
        fabric_lines = self._build_fabric(root_lines, node_lines) if len(self.nodes) > 1 else []
        _ip_batch(None, root_lines)
        for node in self.nodes.values():
            _ip_batch(node.netns, node_lines[node.name])
        if len(self.nodes) > 1:
            _ip_batch(self.fabric_netns, fabric_lines)
            for node in self.nodes.values():  # a node routes between its pods and the other nodes
                _run("ip", "netns", "exec", node.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1",
                     "net.ipv6.conf.all.forwarding=1")
        for pod in self.pods.values():
            node = self.nodes[pod.node]
            _ip_batch(pod.netns, [
                "link set lo up",
                f"addr add {pod.ipv4}/24 dev eth0",
                f"addr add {pod.ipv6}/64 dev eth0 nodad",
                "link set eth0 up",
                # the other nodes' pods are behind this node; nothing else is routed (a VIP stays unreachable)
                f"route add {V4_NET} via {node.ipv4}",
                f"route add {V6_NET} via {node.ipv6}",
            ])

    def _build_fabric(self, root_lines: list[str], node_lines: dict[str, list[str]]) -> list[str]:
        """The network between nodes: a bridge in a namespace of its own, one veth per node. Adds the
        veths and routes to the other batches; returns the fabric namespace's own."""
        fabric = self.fabric_netns
        _run("ip", "netns", "add", fabric)
        fabric_lines = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
        for k, node in enumerate(self.nodes.values(), start=1):
            root_lines.append(f"link add up0 netns {node.netns} type veth peer name n{k} netns {fabric}")
            fabric_lines.append(f"link set n{k} master br0 up")
            lines = node_lines[node.name]
            lines += ["link set up0 up", f"addr add {node.fabric4}/{FABRIC_V4.prefixlen} dev up0",
                      f"addr add {node.fabric6}/{FABRIC_V6.prefixlen} dev up0 nodad"]
            for other in self.nodes.values():
                if other.name != node.name:
                    lines += [f"route add {other.subnet4} via {other.fabric4}",
                              f"route add {other.subnet6} via {other.fabric6}"]
        return fabric_lines

    @property
    def fabric_netns(self) -> str:
        return f"{PREFIX}{self.id}-fabric"

    def _build_cgroups(self) -> None:
        self.root_cgroup.mkdir(exist_ok=True)
        for node in self.nodes.values():
            Path(node.cgroup).mkdir(exist_ok=True)
        for pod in self.pods.values():
            Path(pod.cgroup).mkdir(exist_ok=True)

    def _start_sandboxes(self) -> None:
        """One process per pod holds its namespace and cgroup, as a pause container does; the agent finds
        a pod's network namespace through it. Killed with the cgroup on down()."""
        for pod in self.pods.values():
            # setsid -f: the sandbox is nobody's child here (init reaps it), so a killed one never lingers as a
            # zombie that keeps its cgroup from being removed.
            self.run(pod.name, ["setsid", "-f", "sleep", "infinity"], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)

    def attach_bpf(self, defines: dict[str, str] | None = None, src_dir: Path = loader.SRC_DIR) -> None:
        """Load the programs at each node's cgroup and register the node's pods (and loopback) as local.
        `src_dir`: the C sources to compile (tests load an older version, then upgrade)."""
        for node in self.nodes.values():
            loader.load(node.instance, Path(node.cgroup), defines, src_dir)
            with open_pinned(loader.pin_dir(node.instance)) as maps:
                for i, pod in enumerate(self.pods.values()):
                    if pod.node == node.name:  # a pod identity of its own, clear of the reserved ones (HOST...)
                        maps.local_endpoints[pod.ipv4] = SECURITY_MIN + i
                        maps.local_endpoints[pod.ipv6] = SECURITY_MIN + i
                if self.loopback:
                    maps.local_endpoints["127.0.0.1"] = 0
                    maps.local_endpoints["::1"] = 0
        self.attach = True
        if self.guard:
            self.guard_splices()

    def guard_splices(self) -> None:
        """Guard the lab's splices as an agent does (accel/splice_guard.py: a splice budget from the node's
        TCP memory) for as long as this Lab object lives: tests, benchmarks, the demo. A lab agent takes over
        (LabAgent stops this one). `accel lab up` runs none (its process exits): its agent guards, or nothing
        does and the splice is unbounded, as before a watcher ever set the budget."""
        if self._guard is not None:
            return
        maps = [open_pinned(loader.pin_dir(n.instance)) for n in self.nodes.values()]

        def set_budget(budget: int) -> None:
            for m in maps:
                m.set_splice_budget(budget)
        self._guard = SpliceGuard(set_budget)
        self._guard_maps = maps
        self._guard.start()

    def stop_guard(self) -> None:
        if self._guard is not None:
            self._guard.stop()
            self._guard = None
        for m in self._guard_maps:
            m.close()
        self._guard_maps = []

    def detach_bpf(self, force: bool = True) -> int:
        """Remove the programs and pins (for tests and benchmarks: force, the lab owns every socket)."""
        self.stop_guard()
        left = sum(loader.uninstall(n.instance, force=force, drain_seconds=2.0) for n in self.nodes.values())
        self.attach = left > 0
        return left

    def down(self) -> None:
        self.stop_guard()
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

    def node(self, name: str) -> LabNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise UserError(f"no node {name!r} in lab {self.id}; nodes: {', '.join(self.nodes)}") from None

    def pods_on(self, node: str) -> list[LabPod]:
        return [p for p in self.pods.values() if p.node == node]

    def node_command(self, argv: Sequence[str], node: str = "node1") -> list[str]:
        """argv wrapped to run as a host-network process of a node: its namespace and its cgroup itself."""
        n = self.node(node)
        enter = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{n.netns}", "--", "sh", "-c", enter, n.cgroup, *argv]

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
            "attach": self.attach,
            "created": time.time(),
            "nodes": [asdict(n) for n in self.nodes.values()],
            "pods": [asdict(p) for p in self.pods.values()],
        }
        (STATE_DIR / f"{self.id}.json").write_text(json.dumps(doc, indent=1))

    @classmethod
    def load_state(cls, lab_id: str) -> Lab:
        try:
            doc = json.loads((STATE_DIR / f"{lab_id}.json").read_text())
        except FileNotFoundError:
            raise UserError(f"no lab {lab_id!r} is up; `accel lab list` shows the labs") from None
        nodes = doc.get("nodes") or []
        lab = cls(len(doc["pods"]), lab_id=doc["id"], attach=doc["attach"], nodes=max(1, len(nodes)))
        if nodes:
            lab.nodes = {n["name"]: LabNode(**n) for n in nodes}
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
    for instance in _instances_of(lab_id):
        try:
            # Every process of the lab is gone, so its spliced sockets are closing: let them drain.
            loader.uninstall(instance, force=True, drain_seconds=2.0)
        except (OSError, UserError, BpfError) as e:
            log.warning("unpin lab=%s instance=%s error=%s", lab_id, instance, e)
    for ns in _netns_names(f"{PREFIX}{lab_id}-"):
        _run("ip", "netns", "del", ns, check=False)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{lab_id}.json").unlink()
    log.info("lab down id=%s", lab_id)


def _instances_of(lab_id: str) -> list[str]:
    """The pin instances of one lab: `lab-<id>` and `lab-<id>-node<k>`."""
    return [i for i in loader.instances() if i == f"lab-{lab_id}" or i.startswith(f"lab-{lab_id}-node")]


def _netns_names(prefix: str) -> list[str]:
    d = Path("/run/netns")
    return sorted(p.name for p in d.iterdir() if p.name.startswith(prefix)) if d.is_dir() else []


def down_all() -> list[str]:
    """Remove every lab on this host, including what a crashed run left without a state file."""
    ids = set(list_labs())
    ids |= {n[len(PREFIX) :].split("-", 1)[0] for n in _netns_names(PREFIX)}
    root = cgroup2_root()
    ids |= {p.name[len(PREFIX) + 4 :] for p in root.glob(f"{PREFIX}lab-*")}
    ids |= {i[4:].split("-node", 1)[0] for i in loader.instances() if i.startswith("lab-")}
    for lab_id in sorted(ids):
        _teardown(lab_id)
    return sorted(ids)
