"""The agent's identity policy: the compiler (accel/policy) follows the model, its diffs go to the kernel's
maps in the order the compiler gives (no moment opens a hole), connections a change no longer allows are
closed, and denied attempts are counted per rule.

From a policy event to the kernel: ClusterState.apply -> ChangeSet -> PolicyEnforcer.on_change ->
PolicyCompiler.on_change -> PolicyDiff.ops -> `_write` (policy map, ipcache CIDR entries) -> the connect
and ingress hooks decide with them. Then `Revoker` (its own thread) lists the sockets of this node's pods
(netlink sock_diag), judges each with the same verdicts, and destroys the ones now denied:
- a pod's own socket: its egress, and its ingress when it is the server (a listening port of the pod);
- a captured connection to a pod on another node: also that pod's ingress, which its node decides
  (the tunnel's streams there are judged by Envoy RBAC from the same compiler; closing the app's socket
  here ends the stream);
- a tunnelled connection this node's Envoy delivers to a pod (it comes from the node's address): the
  stream's peer principal, from Envoy's access log (accel/tunnels_inbound.py), judged by the pod's inbound
  RBAC; closing the pod's socket ends the stream, whatever the source's node does.
Until the first full sync nothing is written (after an agent restart the kernel keeps the pinned policy);
at the sync the map is read once and corrected entry by entry.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from accel import netns, sockdiag
from accel.metrics import Metrics
from accel.podns import PodNetnsCache
from accel.policy import PolicyCompiler, evaluate
from accel.policy.evaluate import identity_of_address
from accel.policy.rbac import InboundRbac, inbound_rbac
from accel.policy.types import (
    IPCACHE_MAP,
    POLICY_MAP,
    Direction,
    MapOp,
    PolicyDiff,
    PolicyKey,
    PolicyValue,
    Verdict,
)
from accel.state.identity import ID_HOST
from accel.state.model import ChangeSet, Kind, ObjectKey, Workload
from accel.state.store import ClusterState
from accel.tunnels_inbound import InboundTunnel, InboundTunnels
from sockops_bpf.layout import MESH_CAPTURE_PORT
from sockops_bpf.maps import AddressInfo, Backend

log = logging.getLogger(__name__)

POLICY_KINDS = frozenset({Kind.NETWORK_POLICY, Kind.AUTHORIZATION_POLICY, Kind.NAMESPACE})
CIDR_IDENTITIES = range(16, 65536)  # the compiler's CIDR identities: its ipcache entries


class PolicyTables(Protocol):
    """What the enforcer writes: the policy map ((subject, peer, direction, proto, port, port bits) ->
    (verdict, rule)) and the ipcache (CIDR text -> AddressInfo). sockops_bpf.maps views satisfy it."""

    policy: MutableMapping[tuple[int, int, int, int, int, int], tuple[int, int]]
    ipcache: MutableMapping[str, AddressInfo]
    denies: Callable[[], Mapping[int, int]]  # the kernel's deny counters per rule


def owned_by_policy(info: AddressInfo) -> bool:
    """ipcache entries are the pods' (and the node's) or the compiler's CIDRs, told apart by identity."""
    return info.identity in CIDR_IDENTITIES


@dataclass(frozen=True, slots=True)
class Judged:
    """One connection judged for revocation."""

    pod: ObjectKey
    socket: sockdiag.TcpSocket
    verdict: Verdict
    rule: int


def _key(k: PolicyKey) -> tuple[int, int, int, int, int, int]:
    return (k.subject, k.peer, k.direction, k.proto, k.port, k.port_bits)


class PolicyEnforcer:
    def __init__(self, compiler: PolicyCompiler, tables: PolicyTables | None, metrics: Metrics | None = None,
                 pod_owns: Callable[[str], bool] = lambda _k: False) -> None:
        """`tables` None: compile only (memory mode); `pod_owns(cidr)`: an ipcache key the pods' reconciler
        holds (a compiler CIDR equal to a pod's /32 yields to it)."""
        self.compiler = compiler
        self.tables = tables
        self.metrics = metrics
        self.pod_owns = pod_owns
        self.lock = threading.Lock()  # the compiler's tables: the apply thread writes, readers take this
        self.synced = False
        self._rbacs: dict[int, InboundRbac] = {}  # per subject, until the next change
        self.writes = 0
        self.last_diff_seconds = 0.0
        self.on_revoke: Callable[[], None] = lambda: None  # set by the agent: the revoker's wake-up

    # --- following the model -------------------------------------------------------------------
    def on_change(self, cs: ChangeSet) -> None:
        t0 = time.perf_counter()
        with self.lock:
            diff = self.compiler.on_change(cs)
            self._rbacs.clear()
            if self.tables is None:
                return
            if not self.synced:
                if cs.synced:
                    self._full_correction()
                    self.synced = True
                return
            for op in diff.ops:
                self._write(op)
        self.last_diff_seconds = time.perf_counter() - t0
        if self._may_revoke(cs, diff):
            self.on_revoke()

    @staticmethod
    def _may_revoke(cs: ChangeSet, diff: PolicyDiff) -> bool:
        # A remote pod's own policy can change without any entry here changing: policy kinds count too.
        return bool(diff.ops) or any(c.key.kind in POLICY_KINDS for c in cs.changes)

    def _write(self, op: MapOp) -> None:
        assert self.tables is not None
        try:
            if isinstance(op.key, PolicyKey):
                if op.value is None:
                    self.tables.policy.pop(_key(op.key), None)
                elif isinstance(op.value, PolicyValue):
                    self.tables.policy[_key(op.key)] = (op.value.verdict, op.value.rule)
            else:
                cidr = op.key
                if self.pod_owns(cidr):
                    return  # a pod's own address: its entry (and identity) wins
                if op.value is None:
                    self.tables.ipcache.pop(cidr, None)
                elif isinstance(op.value, int):
                    self.tables.ipcache[cidr] = AddressInfo(op.value, 0)
        except OSError as e:
            log.error("event=map_write_failed map=%s key=%s error=%r", op.map, op.key, str(e))
            if self.metrics:
                self.metrics.errors.labels("policy", "map_write").inc()
            return
        self.writes += 1
        if self.metrics:
            self.metrics.map_updates.labels(op.map, "delete" if op.value is None else "update").inc()

    def _full_correction(self) -> None:
        """First sync: make the maps equal to the compiled entries, upserts before deletes (so what stays
        never blinks), without flushing."""
        assert self.tables is not None
        t0 = time.perf_counter()
        compiled = self.compiler.compiled()
        want = dict(compiled.entries)
        have = {PolicyKey(*k): PolicyValue(*v) for k, v in self.tables.policy.items()}
        cidrs = {c: n for c, n in compiled.ipcache.items() if not self.pod_owns(c)}
        have_cidrs = {c: i.identity for c, i in self.tables.ipcache.items() if owned_by_policy(i)}
        for c, n in cidrs.items():
            if have_cidrs.get(c) != n:
                self._write(MapOp(IPCACHE_MAP, c, n))
        for k in sorted(want, key=lambda k: k.peer == 0):  # named peers before ANY: a peer never falls to ANY
            if have.get(k) != want[k]:
                self._write(MapOp(POLICY_MAP, k, want[k]))
        for k in sorted(set(have) - set(want), key=lambda k: k.peer != 0):
            self._write(MapOp(POLICY_MAP, k, None))
        for c in set(have_cidrs) - set(cidrs):
            self._write(MapOp(IPCACHE_MAP, c, None))
        log.info("event=map_corrected map=policy entries=%d cidrs=%d seconds=%.4f", len(want), len(cidrs),
                 time.perf_counter() - t0)

    # --- reading it -----------------------------------------------------------------------------
    def rule_name(self, index: int) -> str:
        with self.lock:
            info = self.compiler.rule(index)  # per denied flow: no copy of the tables
        return str(info.ref) if info is not None else f"rule {index}"

    def rbac(self, subject: int) -> InboundRbac:
        with self.lock:
            return self.rbac_locked(subject)

    def rbac_locked(self, subject: int) -> InboundRbac:
        """The subject's inbound RBAC (what its Envoy listener has); the caller holds `lock`."""
        hit = self._rbacs.get(subject)
        if hit is None:
            if len(self._rbacs) > 4096:
                self._rbacs.clear()
            hit = self._rbacs[subject] = inbound_rbac(self.compiler, subject)
        return hit


class Revoker:
    """Closes, within a second of a change, every established connection of this node's pods that the
    policy no longer allows, and leaves the others alone. Runs in its own thread; `wake()` from anywhere."""

    def __init__(self, enforcer: PolicyEnforcer, state: ClusterState, node: str, netns_cache: PodNetnsCache,
                 orig_dst: Mapping[tuple[int, str, int], Backend] | None, node_addresses: Iterable[str],
                 pods: Callable[[], list[Workload]], metrics: Metrics | None = None,
                 tunnels: InboundTunnels | None = None) -> None:
        self.enforcer = enforcer
        self.tunnels = tunnels
        self.state = state
        self.node = node
        self.netns = netns_cache
        self.orig_dst = orig_dst
        self.node_addresses = {ipaddress.ip_address(a).compressed for a in node_addresses}
        self.pods = pods
        self.metrics = metrics
        self.destroyed = 0
        self.last_round_seconds = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="agent-revoker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def check_tunnel(self, t: InboundTunnel) -> None:
        """A stream that just opened (its access log entry came in): a round if the policy denies it now,
        for a stream that opened under a policy a round has already replaced."""
        w = self.state.workload_by_ip(t.pod_ip)
        if w is None:
            return
        with self.enforcer.lock:
            verdict, _ = self.enforcer.rbac_locked(w.security_identity).verdict(t.principal, t.port)
        if verdict is Verdict.DENY:
            self.wake()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.round()
            except Exception:  # a bug must not stop revocation for the next change; logged and counted
                log.exception("event=revocation_failed")
                if self.metrics:
                    self.metrics.errors.labels("policy", "revocation").inc()

    def round(self) -> int:
        """One pass over this node's pods; the number of connections destroyed."""
        t0 = time.perf_counter()
        destroyed = 0
        for w in self.pods():
            ns = self.netns.get(w.pod)
            if ns is None:
                continue
            try:
                sockets = netns.run_in(ns.path, lambda: sockdiag.tcp_sockets(sockdiag.OPEN_STATES |
                                                                               1 << sockdiag.TCP_LISTEN))
            except OSError as e:
                log.warning("event=sock_diag_failed pod=%s error=%s", w.key, e)
                continue
            denied = [j.socket for j in self.judge(w, ns.cookie, sockets) if j.verdict is Verdict.DENY]
            if denied:
                n = netns.run_in(ns.path, lambda d=denied: sockdiag.destroy(d))  # type: ignore[misc]
                destroyed += n
                log.info("event=connections_revoked pod=%s closed=%d", w.key, n)
        self.destroyed += destroyed
        self.last_round_seconds = time.perf_counter() - t0
        if self.metrics and destroyed:
            self.metrics.revoked.inc(destroyed)
        return destroyed

    def judge(self, w: Workload, cookie: int, sockets: list[sockdiag.TcpSocket]) -> list[Judged]:
        """Each connection of pod `w` with the verdict the kernel would give it now."""
        me = w.security_identity
        listening = {s.sport for s in sockets if s.listening}
        out = []
        with self.enforcer.lock:
            compiled = self.enforcer.compiler.compiled()
            exact = self._exact()
            for s in sockets:
                if s.listening or s.dport == 15008 or s.sport == 15008:
                    continue  # not a connection; HBONE's own legs are Envoy's
                if s.sport in listening:  # this pod serves it
                    peer = self._identity(compiled, exact, s.dst)
                    if _loopback(s.dst):
                        continue
                    if peer == ID_HOST:  # the node itself, or a stream the node Envoy delivers
                        t = self.tunnels.peer(s.dst, s.dport, s.src, s.sport) if self.tunnels is not None else None
                        if t is not None:
                            v, rule = self.enforcer.rbac_locked(me).verdict(t.principal, s.sport)
                            out.append(Judged(w.key, s, v, rule))
                        continue
                    v, rule = evaluate(compiled, me, peer, Direction.INGRESS, 6, s.sport)
                    out.append(Judged(w.key, s, v, rule))
                    continue
                dst, dport = s.dst, s.dport
                if _loopback(dst):
                    if dport != MESH_CAPTURE_PORT or self.orig_dst is None:
                        continue  # within the pod
                    orig = self.orig_dst.get((cookie, s.src, s.sport))
                    if orig is None:
                        continue
                    dst, dport = orig.ip, orig.port
                peer = self._identity(compiled, exact, dst)
                v, rule = evaluate(compiled, me, peer, Direction.EGRESS, 6, dport)
                if v is Verdict.ALLOW:
                    remote = self.state.workload_by_ip(dst)
                    if remote is not None and remote.pod.node != self.node:  # its node decides its ingress
                        v, rule = self.enforcer.compiler.verdict(peer, me, Direction.INGRESS, 6, dport)
                out.append(Judged(w.key, s, v, rule))
        return out

    def _exact(self) -> dict[str, int]:
        return dict.fromkeys(self.node_addresses, ID_HOST)

    def _identity(self, compiled: object, exact: dict[str, int], ip: str) -> int:
        w = self.state.workload_by_ip(ipaddress.ip_address(ip).compressed)
        if w is not None and not w.pod.host_network:
            return w.security_identity
        return identity_of_address(compiled, ip, exact)  # type: ignore[arg-type]


def _loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


# ---- explaining: `accel policy check` and the per-policy deny counters --------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """What the kernel decides for src -> dst:port, and the rule that decided (rule 0: no policy)."""

    verdict: str  # "ALLOW" | "DENY"
    rule: int
    rule_text: str
    decided_by: str  # "egress of <src>" | "ingress of <dst>" | "ingress of <dst> (at its node)" | "no policy"
    src_identity: int
    dst_identity: int


def kernel_lookup(policy: Mapping[tuple[int, int, int, int, int, int], tuple[int, int]], subject: int, peer: int,
                  direction: int, proto: int, port: int) -> tuple[int, int] | None:
    """The kernel's lookup done on the pinned map itself (a full-length LPM key returns the longest match):
    the peer's entries, else every other peer's."""
    for p in (peer, 0):
        v = policy.get((subject, p, direction, proto, port, 16))
        if v is not None:
            return v
    return None


class PolicyExplainer:
    """Answers `accel policy check SRC DST PORT`: identities from the model and the pinned ipcache, verdicts
    from the pinned policy map (what the kernel reads), rule names from the compiler's table."""

    def __init__(self, enforcer: PolicyEnforcer, state: ClusterState, node: str,
                 policy_map: Mapping[tuple[int, int, int, int, int, int], tuple[int, int]] | None,
                 ipcache: Mapping[str, AddressInfo] | None) -> None:
        self.enforcer = enforcer
        self.state = state
        self.node = node
        self.policy_map = policy_map
        self.ipcache = ipcache

    def _address(self, text: str) -> tuple[str, Workload | None]:
        """An IP, or a pod as namespace/name; the pod's workload when it is one."""
        if "/" in text:
            ns, _, name = text.partition("/")
            w = self.state.workload(ObjectKey(Kind.POD, ns, name))
            if w is None or not w.pod.ips:
                raise ValueError(f"no pod {text!r} with an address in the model")
            return w.pod.ips[0], w
        try:
            ip = ipaddress.ip_address(text).compressed
        except ValueError:
            raise ValueError(f"{text!r} is neither an IP address nor a pod (namespace/name)") from None
        return ip, self.state.workload_by_ip(ip)

    def _identity(self, ip: str, w: Workload | None) -> int:
        if self.ipcache is not None:
            hit = self.ipcache.get(f"{ip}/{ipaddress.ip_address(ip).max_prefixlen}")  # LPM: longest match
            if hit is not None:
                return hit.identity
            return 2  # WORLD
        return w.security_identity if w is not None and not w.pod.host_network else 2

    def check(self, src: str, dst: str, port: int, proto: int = 6) -> Check:
        src_ip, sw = self._address(src)
        dst_ip, dw = self._address(dst)
        s_id, d_id = self._identity(src_ip, sw), self._identity(dst_ip, dw)
        steps: list[tuple[str, int, int, Direction]] = []
        if sw is not None and on_this_node(sw, self.node):
            steps.append((f"egress of {src}", s_id, d_id, Direction.EGRESS))
        if dw is not None and on_this_node(dw, self.node):
            steps.append((f"ingress of {dst}", d_id, s_id, Direction.INGRESS))
        allowed: tuple[int, str] | None = None  # the last rule that allowed it, if one did
        for what, subject, peer, direction in steps:
            if self.policy_map is not None:
                v = kernel_lookup(self.policy_map, subject, peer, int(direction), proto, port)
                verdict, rule = (Verdict(v[0]), v[1]) if v is not None else (Verdict.ALLOW, 0)
            else:
                with self.enforcer.lock:
                    verdict, rule = evaluate(self.enforcer.compiler.compiled(), subject, peer, direction, proto, port)
            if verdict is Verdict.DENY:
                return Check("DENY", rule, self.enforcer.rule_name(rule), what, s_id, d_id)
            if rule:
                allowed = (rule, what)
        if dw is not None and not on_this_node(dw, self.node):
            with self.enforcer.lock:
                verdict, rule = self.enforcer.compiler.verdict(d_id, s_id, Direction.INGRESS, proto, port)
            if verdict is Verdict.DENY:
                return Check("DENY", rule, self.enforcer.rule_name(rule), f"ingress of {dst} (at its node)",
                             s_id, d_id)
            if rule:
                allowed = (rule, f"ingress of {dst} (at its node)")
        if allowed is not None:
            return Check("ALLOW", allowed[0], self.enforcer.rule_name(allowed[0]), allowed[1], s_id, d_id)
        return Check("ALLOW", 0, "no policy applies", "no policy", s_id, d_id)


def on_this_node(w: Workload, node: str) -> bool:
    return w.pod.node == node and not w.pod.host_network


class DenyCounters(Collector):
    """meshaccel_policy_denied_total{policy, rule}: attempts the kernel denied, per rule (read from the
    pinned per-CPU counters at scrape time)."""

    def __init__(self, denies: Callable[[], Mapping[int, int]], enforcer: PolicyEnforcer) -> None:
        self.denies = denies
        self.enforcer = enforcer

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily("meshaccel_policy_denied", "Connections and datagrams denied by policy, per rule",
                                  labels=["policy", "rule"])
        with self.enforcer.lock:
            rules = dict(self.enforcer.compiler.compiled().rules)
        for index, n in sorted(self.denies().items()):
            info = rules.get(index)
            if info is None:
                fam.add_metric(["unknown", str(index)], n)
            else:
                ref = info.ref
                fam.add_metric([f"{ref.kind}/{ref.namespace}/{ref.name}" if ref.name else ref.part, ref.part], n)
        yield fam
