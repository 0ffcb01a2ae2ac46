"""The service LB reconciler: Services and EndpointSlices of the state model -> the lb_* maps of
sock_lb.c (kube-proxy's job, done with hash-map writes instead of rule tables).

One Service or EndpointSlice event recomputes that one service and writes only what differs:
typically one or two slot writes, a membership write and one service-entry write, whatever the
number of services. The order of writes keeps every service usable at every instant (maps.h):
new slots are written before `count` grows, `count` shrinks before slots are deleted, and removed
backends leave the membership map first so session affinity stops choosing them.

Selection rules, as kube-proxy applies them:
- only `ready` endpoints; serving-and-terminating ones only when none is ready;
- `internalTrafficPolicy: Local` keeps only endpoints on this node (none -> refused, as kube-proxy drops);
- a port is matched to EndpointSlice ports by its name (this resolves named targetPorts);
- the first address of an endpoint is the one used (the EndpointSlice API says consumers do so).

A service with no usable backend is refused at connect() (ECONNREFUSED); with the cluster's service
ranges given (`service_cidrs`), so is an address there that is no service at all (e.g. just deleted).
Pods that keep service addresses (Istio sidecar/ambient, meshaccel.io/exclude) go into lb_skip by
their network namespace cookie, which `netns_cookie_of(pod)` supplies (netns_cookie() reads one).

Bad input (a port of 0, an address of the wrong family, more backends than a slot table holds, a
service with ports but neither selector nor EndpointSlices, two services claiming one address) is
logged once with the object and counted in meshaccel_bad_input_total; the rest keeps working.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from accel import netns
from accel.metrics import Metrics
from accel.state.model import ChangeSet, EndpointSlice, Kind, ObjectKey, Pod, Service, ServicePort, Workload
from accel.state.store import ClusterState
from sockops_bpf.layout import LB_F_AFFINITY, LB_MAX_BACKENDS, LB_SKIP_EXCLUDED, LB_SKIP_ISTIO
from sockops_bpf.maps import Backend, Frontend, ServiceEntry

log = logging.getLogger(__name__)

PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, the Kubernetes default for ClientIP
SO_NETNS_COOKIE = 71  # asm-generic/socket.h, Linux >= 5.14


class LbTables(Protocol):
    """What the reconciler writes: sockops_bpf.maps.LbMaps (pinned maps) satisfies it."""

    services: MutableMapping[Frontend, ServiceEntry]
    slots: MutableMapping[tuple[int, int], Backend]
    members: MutableMapping[tuple[int, Backend], int]
    skip: MutableMapping[int, int]
    service_cidrs: MutableMapping[str, int]


@dataclass(frozen=True, slots=True)
class FrontendSpec:
    """What one frontend should hold: backends in a stable order, affinity settings."""

    service: ObjectKey
    backends: tuple[Backend, ...]
    flags: int = 0
    affinity_timeout: int = 0


@dataclass(slots=True)
class _Programmed:
    """What we wrote for one frontend (the mirror of lb_services / lb_slots / lb_members)."""

    id: int
    entry: ServiceEntry
    slots: list[Backend] = field(default_factory=list)


# ---- desired state: pure functions of the model --------------------------------------------------

Problem = Callable[[str, ObjectKey, str, str], None]  # (reason, object, detail, message)


def _family(ip: str) -> int | None:
    try:
        return ipaddress.ip_address(ip).version
    except ValueError:
        return None


def _slice_port(sl: EndpointSlice, sp: ServicePort, problem: Problem) -> int | None:
    """The number a service port maps to in this slice: the slice port of the same name and protocol."""
    for ep in sl.ports:
        if ep.name == sp.name and (ep.protocol or "TCP") == sp.protocol:
            if not ep.port or not 0 < ep.port < 65536:
                problem("endpoint_port_invalid", sl.key, f"{sp.name}={ep.port}",
                        f"object={sl.key} port={sp.name!r} has port {ep.port}; this slice gives that port no backend")
                return None
            return ep.port
    return None


def backends_for(svc: Service, sp: ServicePort, family: int, slices: Iterable[EndpointSlice], node: str,
                 problem: Problem, max_backends: int = LB_MAX_BACKENDS) -> tuple[Backend, ...]:
    """The backends one service port of one address family should use, kube-proxy's way."""
    want_type = "IPv4" if family == 4 else "IPv6"
    local_only = svc.internal_traffic_policy == "Local"
    ready: set[Backend] = set()
    fallback: set[Backend] = set()  # serving and terminating: used only when nothing is ready
    for sl in slices:
        if sl.address_type != want_type:
            continue
        port = _slice_port(sl, sp, problem)
        if port is None:
            continue
        for ep in sl.endpoints:
            if not ep.addresses:
                continue
            addr = ep.addresses[0]
            if _family(addr) != family:
                problem("endpoint_address_family", sl.key, addr,
                        f"object={sl.key} address={addr!r} is not an {want_type} address; endpoint skipped")
                continue
            if local_only and ep.node_name != node:
                continue
            b = Backend(str(ipaddress.ip_address(addr)), port)
            if ep.ready:
                ready.add(b)
            elif ep.serving and ep.terminating:
                fallback.add(b)
    chosen = sorted(ready or fallback)
    if len(chosen) > max_backends:
        problem("too_many_backends", svc.key, f"{sp.name}/{family}",
                f"object={svc.key} port={sp.name or sp.port} has {len(chosen)} backends, a slot table holds "
                f"{max_backends}; using the first {max_backends}")
        chosen = chosen[:max_backends]
    return tuple(chosen)


def desired(svc: Service, slices: list[EndpointSlice], node: str, problem: Problem,
            max_backends: int = LB_MAX_BACKENDS) -> dict[Frontend, FrontendSpec]:
    """Every frontend of one Service and what it should hold."""
    out: dict[Frontend, FrontendSpec] = {}
    if svc.type == "ExternalName" or not svc.cluster_ips:
        return out  # headless or DNS-only: nothing to translate
    if svc.ports and svc.selector is None and not slices:
        problem("service_without_selector", svc.key, "",
                f"object={svc.key} has ports but no selector and no EndpointSlice; connections to it are refused")
    affinity = svc.session_affinity == "ClientIP"
    timeout = (svc.session_affinity_timeout or DEFAULT_AFFINITY_TIMEOUT) if affinity else 0
    for vip in svc.cluster_ips:
        family = _family(vip)
        if family is None:
            problem("cluster_ip_invalid", svc.key, vip, f"object={svc.key} clusterIP={vip!r} is not an IP address")
            continue
        for sp in svc.ports:
            proto = PROTOCOLS.get(sp.protocol)
            if proto is None:
                problem("protocol_unsupported", svc.key, sp.protocol,
                        f"object={svc.key} port={sp.name or sp.port} protocol={sp.protocol} is not load-balanced "
                        "(TCP and UDP are)")
                continue
            if not 0 < sp.port < 65536:
                problem("service_port_invalid", svc.key, str(sp.port),
                        f"object={svc.key} port={sp.name!r} number={sp.port} is not a valid port; port skipped")
                continue
            fe = Frontend(str(ipaddress.ip_address(vip)), sp.port, proto)
            out[fe] = FrontendSpec(svc.key, backends_for(svc, sp, family, slices, node, problem, max_backends),
                                   LB_F_AFFINITY if affinity else 0, timeout)
    return out


# ---- the reconciler ----------------------------------------------------------------------------


class ServiceLBReconciler:
    def __init__(self, node: str, tables: LbTables, metrics: Metrics | None = None, *,
                 netns_cookie_of: Callable[[Pod], int | None] | None = None,
                 service_cidrs: Sequence[str] = (), max_backends: int = LB_MAX_BACKENDS) -> None:
        self.node = node
        self.tables = tables
        self.metrics = metrics
        self.netns_cookie_of = netns_cookie_of
        self.max_backends = max_backends
        self.state: ClusterState | None = None  # set by the owner (the agent) before events flow
        self._programmed: dict[Frontend, _Programmed] = {}
        self._owner: dict[Frontend, ObjectKey] = {}
        self._by_service: dict[ObjectKey, set[Frontend]] = {}
        self._skip: dict[ObjectKey, int] = {}  # pod -> netns cookie written to lb_skip
        self._retry: set[ObjectKey] = set()
        self._pending: set[ObjectKey] = set()  # services changed before the first full sync
        self._pending_workloads: dict[ObjectKey, Workload | None] = {}
        self._skip_retry: dict[ObjectKey, Workload] = {}  # namespace not found yet: tried on every change
        self._reported: set[tuple[str, ObjectKey, str]] = set()
        self._next_id = 1
        # (namespace, service, port) -> the node Envoy's listener for that L7 service port: its TCP
        # frontends then lead there instead of to the endpoints (set by the agent's xDS bridge).
        self.l7_targets: dict[tuple[str, str, int], tuple[str, int]] = {}
        self.synced = False
        self.map_ops = 0  # writes and deletes issued, for tests and benchmarks
        if service_cidrs:
            self.set_service_cidrs(service_cidrs)

    def set_service_cidrs(self, cidrs: Sequence[str]) -> None:
        """The cluster's service ranges: an address there with no service is refused (ECONNREFUSED at
        once, as for a service without endpoints) instead of wandering off to the default route."""
        want: set[str] = set()
        for c in cidrs:
            try:
                want.add(str(ipaddress.ip_network(c, strict=True)))
            except ValueError as e:
                self._problem("service_cidr_invalid", ObjectKey(Kind.SERVICE, "", "-"), c,
                              f"service CIDR {c!r} is not a network address ({e}); ignored")
        have = set(self.tables.service_cidrs)
        for c in sorted(want - have):
            self._put(self.tables.service_cidrs, c, 1)
        for c in sorted(have - want):
            self._del(self.tables.service_cidrs, c)

    # --- entry points ---------------------------------------------------------------------------

    def set_l7_targets(self, targets: dict[tuple[str, str, int], tuple[str, int]]) -> None:
        """Point L7 service ports at Envoy's listeners (or back at their endpoints when withdrawn)."""
        changed = {k for k in targets.keys() | self.l7_targets.keys() if targets.get(k) != self.l7_targets.get(k)}
        self.l7_targets = dict(targets)
        if self.synced:
            for ns, name in sorted({(ns, name) for ns, name, _ in changed}):
                self.sync_service(ObjectKey(Kind.SERVICE, ns, name))
        else:
            self._pending |= {ObjectKey(Kind.SERVICE, ns, name) for ns, name, _ in changed}

    def _via_envoy(self, key: ObjectKey, want: dict[Frontend, FrontendSpec]) -> dict[Frontend, FrontendSpec]:
        out = {}
        for fe, spec in want.items():
            target = self.l7_targets.get((key.namespace, key.name, fe.port))
            if target is not None and fe.proto == socket.IPPROTO_TCP and _family(fe.vip) == _family(target[0]):
                spec = FrontendSpec(spec.service, (Backend(*target),))
            out[fe] = spec
        return out

    def retry_skips(self) -> int:
        """Look again for the namespaces of pods that keep service addresses but had no process yet
        (the agent calls this while idle, so a quiet cluster does not leave them translated)."""
        for key, w in list(self._skip_retry.items()):
            self._sync_skip(key, w)
        return len(self._skip_retry)

    def frontend_count(self) -> int:
        """Service frontends (VIP, port, protocol) programmed now."""
        return len(self._programmed)

    def adopt(self) -> int:
        """Take over what the maps already hold (an agent restart): nothing is flushed, so service
        traffic keeps flowing; what no service claims any more goes at the first full sync."""
        slots = dict(self.tables.slots.items())
        for fe, entry in self.tables.services.items():
            prog = _Programmed(entry.id, entry, [slots[(entry.id, i)] for i in range(entry.count)
                                                 if (entry.id, i) in slots])
            prog.entry = ServiceEntry(entry.id, len(prog.slots), entry.flags, entry.affinity_timeout)
            self._programmed[fe] = prog
            self._next_id = max(self._next_id, entry.id + 1)
        return len(self._programmed)

    def on_change(self, cs: ChangeSet) -> None:
        touched: set[ObjectKey] = set(self._retry)
        self._retry.clear()
        for ch in cs.changes:
            if ch.key.kind is Kind.SERVICE:
                touched.add(ch.key)
            elif ch.key.kind is Kind.ENDPOINT_SLICE:
                for rec in (ch.old, ch.new):
                    if isinstance(rec, EndpointSlice) and rec.service_name:
                        touched.add(ObjectKey(Kind.SERVICE, rec.namespace, rec.service_name))
        if not self.synced and not cs.synced:
            # Before the first full sync the model is partial: a service may lack some of its slices.
            # The maps keep serving what they hold (adopt()) until the model is whole.
            self._pending |= touched
            self._pending_workloads.update({wc.key: wc.new for wc in cs.workloads})
            return
        touched |= self._pending
        self._pending = set()
        for key in sorted(touched):
            self.sync_service(key)
        workloads: dict[ObjectKey, Workload | None] = dict(self._skip_retry)
        workloads.update(self._pending_workloads)
        self._pending_workloads = {}
        workloads.update({wc.key: wc.new for wc in cs.workloads})
        for wkey, w in workloads.items():
            self._sync_skip(wkey, w)
        if cs.synced and not self.synced:
            self._drop_unclaimed()
            self.synced = True
        if self.metrics:
            self.metrics.map_entries.labels("lb_services").set(len(self._programmed))

    def sync_service(self, key: ObjectKey) -> None:
        """Make one service's frontends in the maps equal to what the model says."""
        assert self.state is not None, "set .state before feeding changes"
        svc = self.state.get(key)
        want: dict[Frontend, FrontendSpec] = {}
        if isinstance(svc, Service):
            want = desired(svc, self.state.slices_of(key.namespace, key.name), self.node, self._problem,
                           self.max_backends)
            if self.l7_targets:
                want = self._via_envoy(key, want)
        for fe in list(want):
            owner = self._owner.get(fe)
            if owner is not None and owner != key:
                self._problem("cluster_ip_conflict", key, f"{fe.vip}:{fe.port}",
                              f"object={key} address={fe.vip}:{fe.port} is already served for {owner}; ignored")
                del want[fe]
        for fe in self._by_service.get(key, set()) - want.keys():
            self._remove(fe)
        for fe, spec in want.items():
            try:
                self._program(fe, spec)
            except OSError as e:
                log.error("event=map_write_failed component=servicelb object=%s frontend=%s:%d error=%r "
                          "action=retry_next_change", key, fe.vip, fe.port, str(e))
                if self.metrics:
                    self.metrics.errors.labels("servicelb", "map_write").inc()
                self._retry.add(key)
                self._remove(fe)  # best effort; next time from scratch, under a new id
                continue
            self._owner[fe] = key
            self._by_service.setdefault(key, set()).add(fe)

    # --- writing one frontend -------------------------------------------------------------------

    def _program(self, fe: Frontend, spec: FrontendSpec) -> None:
        t = self.tables
        cur = self._programmed.get(fe)
        if cur is None:
            sid = self._next_id
            self._next_id += 1
            prog = _Programmed(sid, ServiceEntry(sid, 0))
            self._programmed[fe] = prog
            for i, b in enumerate(spec.backends):  # slots first, the entry last: never seen half-filled
                self._put(t.slots, (sid, i), b)
                self._put(t.members, (sid, b), i)
                prog.slots.append(b)
            prog.entry = ServiceEntry(sid, len(spec.backends), spec.flags, spec.affinity_timeout)
            self._put(t.services, fe, prog.entry)
            return
        sid, slots = cur.id, cur.slots
        old_len = len(slots)
        new_set = set(spec.backends)
        have = set(slots)
        removed = [b for b in slots if b not in new_set]
        added = [b for b in spec.backends if b not in have]
        index = {b: i for i, b in enumerate(slots)}
        for b in removed:  # affinity stops choosing them before anything else moves
            self._del(t.members, (sid, b))
        while removed and added:  # reuse a removed backend's slot: one write swaps them
            r, a = removed.pop(), added.pop(0)
            i = index.pop(r)
            slots[i] = a
            index[a] = i
            self._put(t.slots, (sid, i), a)
            self._put(t.members, (sid, a), i)
        for a in added:  # grow: the slot exists before count covers it
            index[a] = len(slots)
            self._put(t.slots, (sid, len(slots)), a)
            self._put(t.members, (sid, a), len(slots))
            slots.append(a)
        if removed:  # shrink: move survivors from the tail into holes below the new count
            gone = set(removed)
            new_len = len(slots) - len(removed)
            holes = sorted(index[r] for r in removed if index[r] < new_len)
            tail = [i for i in range(new_len, len(slots)) if slots[i] not in gone]
            for h, s in zip(holes, tail, strict=True):
                b = slots[s]
                slots[h] = b
                self._put(t.slots, (sid, h), b)
                self._put(t.members, (sid, b), h)
            del slots[new_len:]
        entry = ServiceEntry(sid, len(slots), spec.flags, spec.affinity_timeout)
        if entry != cur.entry:
            self._put(t.services, fe, entry)
            cur.entry = entry
        for i in range(len(slots), old_len):  # only once count no longer covers them
            self._del(t.slots, (sid, i))

    def _remove(self, fe: Frontend) -> None:
        """The entry goes first (new connections stop matching), then its slots."""
        prog = self._programmed.get(fe)
        try:
            if prog is not None:
                self._del(self.tables.services, fe)
                for i, b in enumerate(prog.slots):
                    self._del(self.tables.slots, (prog.id, i))
                    self._del(self.tables.members, (prog.id, b))
        except OSError as e:
            log.error("event=map_delete_failed component=servicelb frontend=%s:%d error=%r", fe.vip, fe.port, str(e))
            if self.metrics:
                self.metrics.errors.labels("servicelb", "map_delete").inc()
        self._forget(fe)

    def _forget(self, fe: Frontend) -> None:
        self._programmed.pop(fe, None)
        owner = self._owner.pop(fe, None)
        if owner is not None:
            fes = self._by_service.get(owner)
            if fes is not None:
                fes.discard(fe)
                if not fes:
                    del self._by_service[owner]

    def _drop_unclaimed(self) -> None:
        """After the first full sync: frontends adopted from the maps that no service claims."""
        stale = [fe for fe in self._programmed if fe not in self._owner]
        for fe in stale:
            self._remove(fe)
        if stale:
            log.info("event=lb_stale_removed frontends=%d", len(stale))

    def _put(self, table: MutableMapping, key: object, value: object) -> None:  # type: ignore[type-arg]
        table[key] = value
        self.map_ops += 1

    def _del(self, table: MutableMapping, key: object) -> None:  # type: ignore[type-arg]
        table.pop(key, None)
        self.map_ops += 1

    # --- namespaces that keep service addresses -------------------------------------------------

    def _sync_skip(self, key: ObjectKey, w: Workload | None) -> None:
        want: tuple[int, int] | None = None  # (netns cookie, reason)
        self._skip_retry.pop(key, None)
        if w is not None and w.pod.node == self.node and not w.pod.host_network and (w.excluded or w.istio_managed):
            cookie = self.netns_cookie_of(w.pod) if self.netns_cookie_of else None
            if cookie is None:
                self._problem("skip_netns_unknown", key, "",
                              f"object={key} should keep service addresses (excluded or Istio) but its network "
                              "namespace is unknown yet; its connections are translated until it is found")
                self._skip_retry[key] = w
            else:
                want = (cookie, LB_SKIP_EXCLUDED if w.excluded else LB_SKIP_ISTIO)
        old = self._skip.get(key)
        if old is not None and (want is None or want[0] != old):
            self._del(self.tables.skip, old)
            del self._skip[key]
        if want is not None:
            self._put(self.tables.skip, want[0], want[1])
            self._skip[key] = want[0]

    # --- reporting ----------------------------------------------------------------------------------

    def _problem(self, reason: str, key: ObjectKey, detail: str, message: str) -> None:
        mark = (reason, key, detail)
        if mark in self._reported:
            return
        if len(self._reported) > 100_000:
            self._reported.clear()
        self._reported.add(mark)
        log.warning("event=bad_input component=servicelb reason=%s %s", reason, message)
        if self.metrics:
            self.metrics.bad_input.labels(reason).inc()

    # --- queries (tests, status) ----------------------------------------------------------------

    def frontend(self, fe: Frontend) -> tuple[ServiceEntry, list[Backend]] | None:
        prog = self._programmed.get(fe)
        return (prog.entry, list(prog.slots)) if prog else None

    def matches_maps(self) -> bool:
        """The maps hold exactly our mirror (reads whole maps: tests only)."""
        services = dict(self.tables.services.items())
        if services != {fe: p.entry for fe, p in self._programmed.items()}:
            return False
        slots = {(p.id, i): b for p in self._programmed.values() for i, b in enumerate(p.slots)}
        members = {(p.id, b): i for p in self._programmed.values() for i, b in enumerate(p.slots)}
        return dict(self.tables.slots.items()) == slots and dict(self.tables.members.items()) == members


# ---- network namespace cookies (which client a socket belongs to) --------------------------------


def netns_cookie(netns_path: str) -> int:
    """The kernel's cookie of a network namespace (what bpf_get_netns_cookie returns in it), read from a
    socket opened inside it; this process's own namespace never changes."""
    def read() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), sys.byteorder)
    return netns.run_in(netns_path, read)

