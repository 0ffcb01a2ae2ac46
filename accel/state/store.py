"""ClusterState: the one in-memory model. Applies source events in batches, keeps derived views
(workloads with identity and mTLS mode, IP -> pod, slices by service) up to date, and hands each
subscriber exactly what changed, so reconcilers do work proportional to the change."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from accel.state.identity import DEFAULT_TRUST_DOMAIN, IdentityAllocator, spiffe_id
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
    Pod,
    Record,
    Service,
    Workload,
    WorkloadChange,
    service_is_l7,
)

log = logging.getLogger(__name__)

Subscriber = Callable[[ChangeSet], None]
# (reason, message): reason is a short metric label, message the one-line log text.
ProblemReporter = Callable[[str, str], None]


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
    ) -> None:
        self.trust_domain = trust_domain
        self.default_mtls = default_mtls
        self.identities = IdentityAllocator(state_dir)
        self._on_problem = on_problem
        self._reported: set[tuple[str, ObjectKey, str]] = set()
        self._records: dict[Kind, dict[ObjectKey, Record]] = {k: {} for k in Kind}
        self._workloads: dict[ObjectKey, Workload] = {}
        self._identity_cache: dict[tuple[str, str], Identity] = {}
        self._pods_by_ns: dict[str, set[ObjectKey]] = {}
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

    def _problem(self, reason: str, key: ObjectKey, value: str, message: str) -> None:
        # Once per (reason, object, value): a bad annotation on a namespace must not log per pod.
        mark = (reason, key, value)
        if mark in self._reported:
            return
        if len(self._reported) > 100_000:
            self._reported.clear()
        self._reported.add(mark)
        self._on_problem(reason, message)

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
            out.append(WorkloadChange(key, old, new))
        return out

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
        mode = self._mtls_value(pod.key, pod.annotations) or ns_mode or self.default_mtls
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
