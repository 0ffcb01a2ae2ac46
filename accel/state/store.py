"""ClusterState: the one in-memory model. Applies source events in batches, keeps derived views
(workloads with identity, security identity and mTLS mode, IP -> pod, slices by service) up to date,
and hands each subscriber exactly what changed, so reconcilers do work proportional to the change.

A workload's mTLS mode, most specific first: the pod's `meshaccel.io/mtls` annotation, its
namespace's, then Istio PeerAuthentication (a workload-selector policy in the pod's namespace, then
the namespace-wide one, then the namespace-wide one of the root namespace; the oldest of equals wins;
UNSET defers to the next level), then the install default."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from accel.state.identity import (
    DEFAULT_TRUST_DOMAIN,
    SECURITY_MIN,
    U32_MAX,
    IdentityAllocator,
    security_key,
    spiffe_id,
)
from accel.state.model import (
    EXCLUDE_LABEL,
    ISTIO_DATAPLANE_MODE,
    ISTIO_SIDECAR_STATUS,
    MTLS_ANNOTATION,
    Change,
    ChangeSet,
    EndpointSlice,
    Event,
    EventType,
    HTTPRoute,
    Identity,
    Kind,
    MtlsMode,
    Namespace,
    ObjectKey,
    PeerAuthentication,
    Pod,
    Record,
    SecurityIdentity,
    Service,
    Workload,
    WorkloadChange,
    service_is_l7,
)

log = logging.getLogger(__name__)

Subscriber = Callable[[ChangeSet], None]
# (reason, message): reason is a short metric label, message the one-line log text.
ProblemReporter = Callable[[str, str], None]
# (reason, object, message): the same problem with the object it is about (a Kubernetes Event on it,
# accel/events.py).
ObjectProblemReporter = Callable[[str, ObjectKey, str], None]

DEFAULT_ROOT_NAMESPACE = "istio-system"  # Istio's default: its policies there apply mesh-wide
_PA_MODES = {"STRICT": MtlsMode.STRICT, "PERMISSIVE": MtlsMode.PERMISSIVE, "DISABLE": MtlsMode.DISABLE}


def _log_problem(reason: str, message: str) -> None:
    log.warning("event=bad_input reason=%s %s", reason, message)


class ClusterState:
    """Single writer (the agent's apply loop); readers may call the query methods from any thread."""

    def __init__(
        self,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        default_mtls: MtlsMode = MtlsMode.DISABLE,
        state_dir: Path | None = None,
        on_problem: ProblemReporter = _log_problem,
        on_object_problem: ObjectProblemReporter | None = None,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    ) -> None:
        self.trust_domain = trust_domain
        self.default_mtls = default_mtls
        self.root_namespace = root_namespace
        self.identities = IdentityAllocator(state_dir)
        self.security_ids = IdentityAllocator(state_dir, low=SECURITY_MIN, high=U32_MAX,
                                              file_name="security_identities.json")
        self._on_problem = on_problem
        self._on_object_problem = on_object_problem
        self._reported: set[tuple[str, ObjectKey, str]] = set()
        self._records: dict[Kind, dict[ObjectKey, Record]] = {k: {} for k in Kind}
        self._workloads: dict[ObjectKey, Workload] = {}
        self._identity_cache: dict[tuple[str, str], Identity] = {}
        self._security_cache: dict[tuple[str, str, tuple[tuple[str, str], ...]], int] = {}
        self._security: dict[int, SecurityIdentity] = {}  # live security identities (some pod has it)
        self._security_refs: dict[int, int] = {}
        self._pods_by_ns: dict[str, set[ObjectKey]] = {}
        self._peer_auth_by_ns: dict[str, set[ObjectKey]] = {}
        self._pod_by_ip: dict[str, ObjectKey] = {}
        self._slices_by_service: dict[tuple[str, str], set[ObjectKey]] = {}
        self._subscribers: list[Subscriber] = []
        self._lock = threading.RLock()
        self.synced = False
        self.generation = 0  # bumped on every applied batch that changed something

    # --- subscription and application ---------------------------------------------------------

    def subscribe(self, fn: Subscriber) -> None:
        self._subscribers.append(fn)

    def apply(self, events: Iterable[Event], *, synced: bool = False) -> ChangeSet:
        """Apply a batch of events; notify subscribers once if anything changed or sync completed."""
        changes: list[Change] = []
        touched_pods: set[ObjectKey] = set()
        with self._lock:
            for ev in events:
                ch = self._apply_one(ev)
                if ch is None:
                    continue
                changes.append(ch)
                if ch.key.kind is Kind.POD:
                    touched_pods.add(ch.key)
                elif ch.key.kind is Kind.NAMESPACE:
                    touched_pods |= self._pods_by_ns.get(ch.key.name, set())
                elif ch.key.kind is Kind.PEER_AUTHENTICATION:
                    for pa in (ch.old, ch.new):
                        if isinstance(pa, PeerAuthentication):
                            touched_pods |= self._pods_under(pa)
            workloads = self._rederive(touched_pods)
            newly_synced = synced and not self.synced
            if synced:
                self.synced = True
            cs = ChangeSet(tuple(changes), tuple(workloads), synced)
            if changes or workloads:
                self.generation += 1
        if changes or workloads or newly_synced or synced:
            for fn in self._subscribers:
                fn(cs)
        return cs

    def _apply_one(self, ev: Event) -> Change | None:
        rec = ev.record
        key = rec.key
        table = self._records[key.kind]
        old = table.get(key)
        if ev.type is EventType.DELETED:
            if old is None:
                return None
            del table[key]
            self._unindex(old)
            return Change(key, old, None)
        if old == rec:
            return None
        if old is not None:
            self._unindex(old)
        table[key] = rec
        self._index(rec)
        return Change(key, old, rec)

    def _index(self, rec: Record) -> None:
        if isinstance(rec, Pod):
            self._pods_by_ns.setdefault(rec.namespace, set()).add(rec.key)
            for ip in rec.ips:
                self._pod_by_ip[ip] = rec.key
        elif isinstance(rec, EndpointSlice):
            self._slices_by_service.setdefault((rec.namespace, rec.service_name), set()).add(rec.key)
            if not rec.service_name:
                self._problem("endpointslice_without_service", rec.key, "",
                              f"object={rec.key} has no kubernetes.io/service-name label; kept, used by no service")
            elif ObjectKey(Kind.SERVICE, rec.namespace, rec.service_name) not in self._records[Kind.SERVICE]:
                self._problem("endpointslice_unknown_service", rec.key, rec.service_name,
                              f"object={rec.key} service={rec.namespace}/{rec.service_name} is unknown; "
                              "kept until the service appears")
        elif isinstance(rec, PeerAuthentication):
            self._peer_auth_by_ns.setdefault(rec.namespace, set()).add(rec.key)
            for text in rec.problems:
                self._problem("peer_authentication_invalid", rec.key, text, f"object={rec.key} {text}")
            if rec.port_level_mtls:
                self._problem("peer_authentication_port_level", rec.key, "",
                              f"object={rec.key} portLevelMtls is not supported (a workload has one mTLS "
                              f"mode); mode {rec.mtls_mode} applies to every port")
        elif isinstance(rec, Service) and rec.selector is None and rec.type != "ExternalName":
            self._problem("service_without_selector", rec.key, "",
                          f"object={rec.key} has no selector; its endpoints come only from EndpointSlices")

    def _unindex(self, rec: Record) -> None:
        if isinstance(rec, Pod):
            keys = self._pods_by_ns.get(rec.namespace)
            if keys is not None:
                keys.discard(rec.key)
                if not keys:
                    del self._pods_by_ns[rec.namespace]
            for ip in rec.ips:
                if self._pod_by_ip.get(ip) == rec.key:
                    del self._pod_by_ip[ip]
        elif isinstance(rec, EndpointSlice):
            sk = (rec.namespace, rec.service_name)
            keys = self._slices_by_service.get(sk)
            if keys is not None:
                keys.discard(rec.key)
                if not keys:
                    del self._slices_by_service[sk]
        elif isinstance(rec, PeerAuthentication):
            keys = self._peer_auth_by_ns.get(rec.namespace)
            if keys is not None:
                keys.discard(rec.key)
                if not keys:
                    del self._peer_auth_by_ns[rec.namespace]

    def _pods_under(self, pa: PeerAuthentication) -> set[ObjectKey]:
        """The pods whose mode this PeerAuthentication can decide: O(pods of its namespace), or of the
        cluster for a namespace-wide policy of the root namespace."""
        if pa.selector is None and pa.namespace == self.root_namespace:
            return set(self._records[Kind.POD])
        keys = self._pods_by_ns.get(pa.namespace, set())
        if pa.selector is None:
            return set(keys)
        pods = self._records[Kind.POD]
        return {k for k in keys if isinstance(p := pods.get(k), Pod) and pa.selector.matches(p.labels)}

    def _problem(self, reason: str, key: ObjectKey, value: str, message: str) -> None:
        # Once per (reason, object, value): a bad annotation on a namespace must not log per pod.
        mark = (reason, key, value)
        if mark in self._reported:
            return
        if len(self._reported) > 100_000:
            self._reported.clear()
        self._reported.add(mark)
        self._on_problem(reason, message)
        if self._on_object_problem is not None:
            self._on_object_problem(reason, key, message)

    # --- derived views ------------------------------------------------------------------------

    def _rederive(self, pod_keys: Iterable[ObjectKey]) -> list[WorkloadChange]:
        out = []
        pods = self._records[Kind.POD]
        for key in sorted(pod_keys):
            old = self._workloads.get(key)
            pod = pods.get(key)
            new = self._derive(pod) if isinstance(pod, Pod) else None
            if old == new:
                continue
            if new is None:
                del self._workloads[key]
            else:
                self._workloads[key] = new
                self._hold_security(new)
            if old is not None:
                self._release_security(old.security_identity)
            out.append(WorkloadChange(key, old, new))
        return out

    def _hold_security(self, w: Workload) -> None:
        n = w.security_identity
        self._security_refs[n] = self._security_refs.get(n, 0) + 1
        if n not in self._security:
            p = w.pod
            self._security[n] = SecurityIdentity(n, p.namespace, p.service_account, p.labels)

    def _release_security(self, n: int) -> None:
        left = self._security_refs.get(n, 0) - 1
        if left > 0:
            self._security_refs[n] = left
        else:
            self._security_refs.pop(n, None)
            self._security.pop(n, None)

    def _security_number(self, pod: Pod) -> int:
        ck = (pod.namespace, pod.service_account, tuple(sorted(pod.labels.items())))
        num = self._security_cache.get(ck)
        if num is None:
            if len(self._security_cache) > 200_000:  # a cache: the allocator keeps the numbers
                self._security_cache.clear()
            num = self._security_cache[ck] = self.security_ids.number(
                security_key(pod.namespace, pod.service_account, pod.labels))
        return num

    def _peer_auth_mode(self, pod: Pod) -> tuple[MtlsMode, str] | None:
        """The mode Istio PeerAuthentication gives the pod: the most specific level that sets one."""
        table = self._records[Kind.PEER_AUTHENTICATION]

        def level(ns: str, selected: bool) -> list[PeerAuthentication]:
            found = [pa for k in self._peer_auth_by_ns.get(ns, ()) if isinstance(pa := table.get(k), PeerAuthentication)
                     and (pa.selector is not None) == selected
                     and (pa.selector is None or pa.selector.matches(pod.labels))]
            found.sort(key=lambda pa: (pa.creation_timestamp or "~", pa.name))  # the oldest first
            if len(found) > 1:
                kind = "workload" if selected else "namespace-wide"
                self._problem("peer_authentication_conflict", found[1].key, found[0].name,
                              f"object={found[1].key} is one of several {kind} PeerAuthentications for "
                              f"pod={pod.namespace}/{pod.name}; the oldest, {found[0].name}, applies")
            return found

        levels = [level(pod.namespace, True), level(pod.namespace, False)]
        if pod.namespace != self.root_namespace:
            levels.append(level(self.root_namespace, False))
        for found in levels:
            if found:
                pa = found[0]
                mode = _PA_MODES.get(pa.mtls_mode)
                if mode is not None:  # UNSET: the next level decides
                    return mode, f"PeerAuthentication/{pa.namespace}/{pa.name}"
        return None

    def _mtls_value(self, where: ObjectKey, annotations: Mapping[str, str]) -> MtlsMode | None:
        raw = annotations.get(MTLS_ANNOTATION)
        if raw is None:
            return None
        try:
            return MtlsMode(raw.strip().lower())
        except ValueError:
            self._problem("mtls_annotation", where, raw,
                          f"object={where} annotation {MTLS_ANNOTATION}={raw!r} is not strict, permissive or "
                          "disable; using the namespace or install default")
            return None

    def _derive(self, pod: Pod) -> Workload:
        ns = self._records[Kind.NAMESPACE].get(ObjectKey(Kind.NAMESPACE, "", pod.namespace))
        ns_labels = ns.labels if isinstance(ns, Namespace) else {}
        ns_mode = self._mtls_value(ns.key, ns.annotations) if isinstance(ns, Namespace) else None
        pod_mode = self._mtls_value(pod.key, pod.annotations)
        decided = ((pod_mode, "pod") if pod_mode else (ns_mode, "namespace") if ns_mode
                   else self._peer_auth_mode(pod) if self._peer_auth_by_ns else None)
        mode, mode_source = decided if decided and decided[0] else (self.default_mtls, "default")
        ident = self._identity_cache.get((pod.namespace, pod.service_account))
        if ident is None:
            sid = spiffe_id(pod.namespace, pod.service_account, self.trust_domain)
            ident = self._identity_cache[(pod.namespace, pod.service_account)] = Identity(sid, self.identities.number(sid))
        return Workload(
            pod=pod,
            identity=ident,
            mtls=mode,
            istio_sidecar=ISTIO_SIDECAR_STATUS in pod.annotations,
            istio_ambient=(pod.labels.get(ISTIO_DATAPLANE_MODE) or ns_labels.get(ISTIO_DATAPLANE_MODE)) == "ambient",
            excluded=pod.labels.get(EXCLUDE_LABEL) == "true" or ns_labels.get(EXCLUDE_LABEL) == "true",
            security_identity=self._security_number(pod),
            mtls_source=mode_source,
        )

    # --- queries --------------------------------------------------------------------------------

    def get(self, key: ObjectKey) -> Record | None:
        with self._lock:
            return self._records[key.kind].get(key)

    def records(self, kind: Kind) -> dict[ObjectKey, Record]:
        """A snapshot copy of every record of one kind."""
        with self._lock:
            return dict(self._records[kind])

    def counts(self) -> dict[Kind, int]:
        with self._lock:
            return {k: len(v) for k, v in self._records.items()}

    def workload(self, key: ObjectKey) -> Workload | None:
        with self._lock:
            return self._workloads.get(key)

    def workloads(self) -> list[Workload]:
        with self._lock:
            return list(self._workloads.values())

    def security_identity(self, number: int) -> SecurityIdentity | None:
        """What a live security identity stands for (the reverse table)."""
        with self._lock:
            return self._security.get(number)

    def security_identities(self) -> dict[int, SecurityIdentity]:
        """Every live security identity: number -> (namespace, service account, labels)."""
        with self._lock:
            return dict(self._security)

    def workload_by_ip(self, ip: str) -> Workload | None:
        with self._lock:
            key = self._pod_by_ip.get(ip)
            return self._workloads.get(key) if key is not None else None

    def slices_of(self, namespace: str, service: str) -> list[EndpointSlice]:
        with self._lock:
            keys = self._slices_by_service.get((namespace, service), set())
            table = self._records[Kind.ENDPOINT_SLICE]
            return [s for k in sorted(keys) if isinstance(s := table.get(k), EndpointSlice)]

    def service_l7(self, namespace: str, name: str) -> bool:
        """Whether the Service goes through the node Envoy (model.service_is_l7)."""
        with self._lock:
            svc = self._records[Kind.SERVICE].get(ObjectKey(Kind.SERVICE, namespace, name))
            routes = [r for r in self._records[Kind.HTTP_ROUTE].values() if isinstance(r, HTTPRoute)]
            return isinstance(svc, Service) and service_is_l7(svc, routes)
