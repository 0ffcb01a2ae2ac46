"""A small cluster for policy tests: objects through the real parser and state model, a compiler
following it as a subscriber, and a mirror of the maps written op by op from its diffs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accel.policy.compiler import PolicyCompiler, PolicyOptions, policy_pod
from accel.policy.evaluate import check_connection, evaluate, identity_of_address
from accel.policy.types import IPCACHE_MAP, Compiled, Direction, PolicyDiff, PolicyKey, PolicyValue, Verdict
from accel.state.identity import ID_HOST
from accel.state.model import ChangeSet, Event, EventType, Kind, ObjectKey
from accel.state.parse import parse_object
from accel.state.store import ClusterState

TCP, UDP, SCTP = 6, 17, 132


def ns(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(name: str, namespace: str, ip: str, labels: dict[str, str] | None = None, *, sa: str = "default",
        node: str = "n1", ports: list[tuple[str, int, str]] | None = None, ips: list[str] | None = None,
        host_network: bool = False) -> dict[str, Any]:
    container = {"name": "app", "ports": [{"name": n, "containerPort": p, "protocol": proto}
                                          for n, p, proto in ports or []]}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [container],
                     "hostNetwork": host_network},
            "status": {"phase": "Running", "podIPs": [{"ip": i} for i in [ip, *(ips or [])]]}}


def netpol(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def authz(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


class MapMirror:
    """What the kernel's maps would hold after writing a diff's ops in order; `after_op` sees each step."""

    def __init__(self) -> None:
        self.entries: dict[PolicyKey, PolicyValue] = {}
        self.ipcache: dict[str, int] = {}

    def apply(self, diff: PolicyDiff, after_op: Callable[[], None] | None = None) -> None:
        for op in diff.ops:
            table: dict[Any, Any] = self.ipcache if op.map == IPCACHE_MAP else self.entries
            if op.value is None:
                assert op.key in table, f"delete of a key the map does not hold: {op.key}"
                del table[op.key]
            else:
                table[op.key] = op.value
            if after_op is not None:
                after_op()

    def compiled(self) -> Compiled:
        return Compiled(self.entries, self.ipcache, {}, ())


ADDRESSES = ["10.1.2.3", "10.1.3.3", "10.2.0.1", "192.168.1.1", "192.168.2.2", "172.16.5.5", "8.8.8.8",
             "10.244.0.200"]
PORTS = (53, 80, 443, 5005, 8080)


class Cluster:
    """`check_writes`: every diff is written op by op, and after each op every sampled (subject,
    peer identity or address, direction, proto, port) must have its verdict of before or after."""

    def __init__(self, *, node: str | None = None, host_always_allowed: bool = True,
                 check_writes: bool = False) -> None:
        self.check_writes = check_writes
        self.problems: list[tuple[str, ObjectKey, str]] = []
        self.state = ClusterState()
        self.compiler = PolicyCompiler(PolicyOptions(node=node, host_always_allowed=host_always_allowed),
                                       on_problem=lambda r, k, m: self.problems.append((r, k, m)))
        self.mirror = MapMirror()
        self.diffs: list[PolicyDiff] = []
        self.state.subscribe(self._follow)

    def _follow(self, cs: ChangeSet) -> None:
        diff = self.compiler.on_change(cs)
        self.diffs.append(diff)
        self.mirror.apply(diff, self._checker(diff) if self.check_writes else None)
        assert self.mirror.entries == self.compiler.entries and self.mirror.ipcache == self.compiler.ipcache

    def _checker(self, diff: PolicyDiff) -> Callable[[], None]:
        exact = self.exact()
        subjects = sorted(self.compiler.subjects | {k.subject for k in self.mirror.entries})
        peers = sorted({k.peer for k in self.mirror.entries} | {k.peer for k in self.compiler.entries} | {0x7777_7777})

        def verdicts(c: Compiled) -> list[tuple[object, Verdict]]:
            out = []
            for s in subjects:
                for d in (0, 1):
                    for proto in (TCP, UDP):
                        for port in PORTS:
                            out += [((s, p, d, proto, port), evaluate(c, s, p, d, proto, port)[0]) for p in peers]
                            out += [((s, a, d, proto, port), evaluate(c, s, identity_of_address(c, a, exact), d, proto,
                                                                      port)[0]) for a in ADDRESSES]
            return out

        old = verdicts(self.mirror.compiled())
        new = verdicts(Compiled(dict(self.compiler.entries), dict(self.compiler.ipcache), {}, ()))

        def check() -> None:
            for (point, v), (_, a), (_, b) in zip(verdicts(self.mirror.compiled()), old, new, strict=True):
                assert v in (a, b), f"{point}: {v.name} between {a.name} and {b.name}"

        return check

    def apply(self, *objs: dict[str, Any]) -> PolicyDiff:
        n = len(self.diffs)
        self.state.apply([Event(EventType.ADDED, parse_object(o)) for o in objs], synced=True)
        return self.diffs[-1] if len(self.diffs) > n else PolicyDiff()

    def delete(self, obj: dict[str, Any]) -> PolicyDiff:
        n = len(self.diffs)
        self.state.apply([Event(EventType.DELETED, parse_object(obj))])
        return self.diffs[-1] if len(self.diffs) > n else PolicyDiff()

    @property
    def compiled(self) -> Compiled:
        return self.compiler.compiled()

    def ident(self, ref: str) -> int:
        """A pod's security identity, by "namespace/name"."""
        namespace, name = ref.split("/")
        w = self.state.workload(ObjectKey(Kind.POD, namespace, name))
        assert w is not None and policy_pod(w), ref
        return w.security_identity

    def exact(self) -> dict[str, int]:
        """The agent's /32 ipcache entries: pod IPs (and this node's address 10.0.255.1 as HOST)."""
        out = {ip: w.security_identity for w in self.state.workloads() if policy_pod(w) for ip in w.pod.ips}
        out["10.0.255.1"] = ID_HOST
        return out

    def address(self, ip: str) -> int:
        return identity_of_address(self.compiled, ip, self.exact())

    def conn(self, src: str, dst: str, port: int, proto: int = TCP) -> Verdict:
        """Pod to pod on one node: the client's egress, then the server's ingress."""
        return check_connection(self.compiled, self.ident(src), self.ident(dst), proto, port)[0]

    def rule_of(self, src: str, dst: str, port: int, proto: int = TCP) -> str:
        v, rule, _ = check_connection(self.compiled, self.ident(src), self.ident(dst), proto, port)
        info = self.compiled.rules.get(rule)
        return str(info.ref) if info is not None else "-"

    def ingress_from(self, ip: str, dst: str, port: int, proto: int = TCP) -> Verdict:
        return evaluate(self.compiled, self.ident(dst), self.address(ip), Direction.INGRESS, proto, port)[0]

    def egress_to(self, src: str, ip: str, port: int, proto: int = TCP) -> Verdict:
        return evaluate(self.compiled, self.ident(src), self.address(ip), Direction.EGRESS, proto, port)[0]
