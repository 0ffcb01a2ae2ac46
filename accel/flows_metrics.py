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
- UDP flows count nothing (Istio has no UDP metrics).
`reporter` is each end this node hosts, as a sidecar there would report: `source` when the source
is local, `destination` when the destination is (both for a same-node flow; `source` when neither is
known to be local). `connection_security_policy` is `mutual_tls` when the flow was encrypted, else
`none`. Missing values are `unknown`, as in Istio.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, generate_latest

from accel.flows import Endpoint, Flow

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
        self._series: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def _admit(self, key: tuple[str, ...]) -> bool:
        if key in self._series:
            return True
        with self._lock:
            if len(self._series) >= self.max_series:
                self.dropped.inc()
                return False
            self._series.add(key)
            return True

    def labels_of(self, flow: Flow, reporter: str) -> tuple[str, ...]:
        ns, _, name = flow.service.partition("/")
        if flow.service:
            service = (f"{name}.{ns}.svc.{self.cluster_domain}", ns, name)
        else:
            service = (UNKNOWN, UNKNOWN, UNKNOWN)
        l7 = flow.path == "l7"
        return (reporter, *end_labels(flow.src, self.cluster), *service, *end_labels(flow.dst, self.cluster),
                "http" if l7 else "tcp", response_flags(flow), "mutual_tls" if flow.encrypted else "none")

    def reporters(self, flow: Flow) -> list[str]:
        out = []
        if self.is_local(flow.src):
            out.append("source")
        if self.is_local(flow.dst):
            out.append("destination")
        return out or ["source"]

    def observe(self, flow: Flow) -> None:
        if flow.proto != "TCP":
            return
        for reporter in self.reporters(flow):
            key = self.labels_of(flow, reporter)
            if flow.path == "l7":
                if flow.event == "close":
                    rkey = (*key, str(flow.http_status))
                    if self._admit(rkey):
                        self.requests.labels(*rkey).inc()
                continue
            if not self._admit(key):
                continue
            if flow.event in ("open", "refused"):
                self.opened.labels(*key).inc()
            if flow.event in ("close", "refused"):
                self.closed.labels(*key).inc()
                if flow.bytes_sent:
                    self.received.labels(*key).inc(flow.bytes_sent)
                if flow.bytes_received:
                    self.sent.labels(*key).inc(flow.bytes_received)

    def series(self) -> int:
        return len(self._series)

    def render(self) -> bytes:
        return generate_latest(self.registry)
