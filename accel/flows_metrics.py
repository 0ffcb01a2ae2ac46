"""Istio's standard metrics, fed from the flow stream, so Istio dashboards and Kiali read meshaccel:
`istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
`istio_tcp_received_bytes_total`, `istio_tcp_sent_bytes_total` and, for L7 requests,
`istio_requests_total`, with Istio's labels (the set and order ztunnel uses, plus `response_code`
on requests).

Labels are workload-level only (never a pod name or an IP), so the series stay bounded by
workloads x services x codes; on top, at most `max_series` label sets are kept and any beyond are
counted in `meshaccel_flow_metrics_dropped_total` instead.

How a flow counts:
- `open` -> connections opened; `close` -> connections closed and the bytes; `refused` (a
  connection that never reached its destination) -> opened and closed, with response flags
  `DENY` (denied by policy), `UH` (no backend) or `CONNECT` (anything else), as ztunnel reports them;
- an L7 request (path `l7`) -> one request with its response code, no TCP counts;
- bytes, named as Istio names them from the server's side: received = request bytes = the flow's
  `bytes_sent` (source -> destination); sent = response bytes = `bytes_received`;
- UDP flows count nothing (Istio has no UDP metrics); nor does the kernel's flow of a connection into
  the node Envoy's L7 listener (Envoy's flows count its requests).
`reporter` is each end this node hosts, as a sidecar there would report: `source` when the source
is local, `destination` when the destination is (both for a same-node flow; `source` when neither is
known to be local). `connection_security_policy` is `mutual_tls` when the flow was encrypted, else
`none`. Missing values are `unknown`, as in Istio.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest

from accel.flows import Endpoint, Flow, into_l7_proxy

UNKNOWN = "unknown"
DEFAULT_MAX_SERIES = 20_000
DEFAULT_CLUSTER = "Kubernetes"  # Istio's cluster id when none is configured

_END = ("workload", "canonical_service", "canonical_revision", "workload_namespace", "principal", "app",
        "version", "cluster")
LABELS = (
    "reporter",
    *(f"source_{n}" for n in _END),
    "destination_service", "destination_service_namespace", "destination_service_name",
    *(f"destination_{n}" for n in _END),
    "request_protocol", "response_flags", "connection_security_policy",
)
REQUEST_LABELS = (*LABELS, "response_code")


def _first(labels: Mapping[str, str], *keys: str) -> str:
    for k in keys:
        v = labels.get(k)
        if v:
            return v
    return ""


def end_labels(ep: Endpoint, cluster: str) -> tuple[str, ...]:
    """The eight per-end values, in `_END` order."""
    if not ep.workload:
        return (UNKNOWN,) * 4 + (ep.identity or UNKNOWN,) + (UNKNOWN,) * 3
    lb = ep.labels
    canonical = _first(lb, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app") or ep.workload
    revision = _first(lb, "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version") or "latest"
    return (ep.workload, canonical, revision, ep.namespace or UNKNOWN, ep.identity or UNKNOWN,
            _first(lb, "app", "app.kubernetes.io/name") or UNKNOWN,
            _first(lb, "version", "app.kubernetes.io/version") or UNKNOWN, cluster)


def response_flags(flow: Flow) -> str:
    if flow.response_flags:
        return flow.response_flags
    if flow.event != "refused" and flow.verdict == "forwarded":
        return "-"
    if flow.verdict == "denied":
        return "DENY"
    return "UH" if flow.reason == "no_backend" else "CONNECT"


class IstioMetrics:
    """`observe(flow)` is the store observer (thread-safe); `render()` the text for /metrics."""

    def __init__(self, is_local: Callable[[Endpoint], bool] | None = None, *, cluster: str = DEFAULT_CLUSTER,
                 cluster_domain: str = "cluster.local", max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.is_local = is_local or (lambda _ep: True)
        self.cluster = cluster
        self.cluster_domain = cluster_domain
        self.max_series = max_series
        r = self.registry = CollectorRegistry()
        self.opened = Counter("istio_tcp_connections_opened", "The total number of TCP connections opened",
                              LABELS, registry=r)
        self.closed = Counter("istio_tcp_connections_closed", "The total number of TCP connections closed",
                              LABELS, registry=r)
        self.received = Counter("istio_tcp_received_bytes",
                                "The size of total bytes received during request in case of a TCP connection",
                                LABELS, registry=r)
        self.sent = Counter("istio_tcp_sent_bytes",
                            "The size of total bytes sent during response in case of a TCP connection",
                            LABELS, registry=r)
        self.requests = Counter("istio_requests", "The total number of requests", REQUEST_LABELS, registry=r)
        self.dropped = Counter("meshaccel_flow_metrics_dropped",
                               "Flows not counted in the Istio metrics because max_series label sets exist",
                               registry=r)
        # Label set -> its children (labels() costs ~5 us a call; a dict lookup does not).
        self._tcp: dict[tuple[str, ...], tuple[Any, Any, Any, Any]] = {}
        self._req: dict[tuple[str, ...], Any] = {}
        self._ends: dict[tuple[str, str, str, int], tuple[Mapping[str, str], tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def _full(self) -> bool:
        if len(self._tcp) + len(self._req) >= self.max_series:
            self.dropped.inc()
            return True
        return False

    def _tcp_children(self, key: tuple[str, ...]) -> tuple[Any, Any, Any, Any] | None:
        children = self._tcp.get(key)
        if children is None:
            with self._lock:
                children = self._tcp.get(key)
                if children is None:
                    if self._full():
                        return None
                    children = (self.opened.labels(*key), self.closed.labels(*key),
                                self.received.labels(*key), self.sent.labels(*key))
                    self._tcp[key] = children
        return children

    def _request_child(self, key: tuple[str, ...]) -> Any:
        child = self._req.get(key)
        if child is None:
            with self._lock:
                child = self._req.get(key)
                if child is None:
                    if self._full():
                        return None
                    child = self._req[key] = self.requests.labels(*key)
        return child

    def _end(self, ep: Endpoint) -> tuple[str, ...]:
        """end_labels, cached per workload (the pod's label mapping is shared by its flows)."""
        key = (ep.workload, ep.namespace, ep.identity, id(ep.labels))
        hit = self._ends.get(key)
        if hit is not None and hit[0] is ep.labels:
            return hit[1]
        values = end_labels(ep, self.cluster)
        if len(self._ends) > 4 * DEFAULT_MAX_SERIES:
            self._ends = {}
        self._ends[key] = (ep.labels, values)  # holding the mapping keeps its id from being reused
        return values

    def labels_of(self, flow: Flow, reporter: str) -> tuple[str, ...]:
        ns, _, name = flow.service.partition("/")
        if flow.service:
            service = (f"{name}.{ns}.svc.{self.cluster_domain}", ns, name)
        else:
            service = (UNKNOWN, UNKNOWN, UNKNOWN)
        l7 = flow.path == "l7"
        return (reporter, *self._end(flow.src), *service, *self._end(flow.dst),
                "http" if l7 else "tcp", response_flags(flow), "mutual_tls" if flow.encrypted else "none")

    def reporters(self, flow: Flow) -> list[str]:
        out = []
        if self.is_local(flow.src):
            out.append("source")
        if self.is_local(flow.dst):
            out.append("destination")
        return out or ["source"]

    def observe(self, flow: Flow) -> None:
        if flow.proto != "TCP" or into_l7_proxy(flow):
            return
        for reporter in self.reporters(flow):
            key = self.labels_of(flow, reporter)
            if flow.path == "l7":
                if flow.event == "close":
                    child = self._request_child((*key, str(flow.http_status)))
                    if child is not None:
                        child.inc()
                continue
            children = self._tcp_children(key)
            if children is None:
                continue
            opened, closed, received, sent = children
            if flow.event in ("open", "refused"):
                opened.inc()
            if flow.event in ("close", "refused"):
                closed.inc()
                if flow.bytes_sent:
                    received.inc(flow.bytes_sent)
                if flow.bytes_received:
                    sent.inc(flow.bytes_received)

    def series(self) -> int:
        """Label sets in use (each is one series per metric it counts in)."""
        return len(self._tcp) + len(self._req)

    def render(self) -> bytes:
        return generate_latest(self.registry)
