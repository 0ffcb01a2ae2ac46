"""The agent's flows: the bounded store, the Istio metrics it feeds, Envoy's access log server and
the /flows endpoint, as one part the agent starts and stops.

Producers hand flows in with `record(flow)` / `record_many(flows)` from any thread (the kernel's
ring-buffer reader, the access log server's loop); `resolver` turns addresses into endpoints the
same way for all of them. Threads: the ALS server's (when `als_listen` is given) and one per open
/flows stream (the HTTP server's). `stop()` ends the streams and the ALS server.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from envoy.service.accesslog.v3 import als_pb2
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from accel.errors import UserError
from accel.flows import DEFAULT_CAPACITY, Flow, FlowStore
from accel.flows_envoy import EnvoyFlows
from accel.flows_http import FlowStreams
from accel.flows_kernel import KernelFlows
from accel.flows_metrics import IstioMetrics
from accel.flows_resolve import EndpointResolver
from accel.state.store import ClusterState
from accel.tunnels_inbound import InboundTunnels
from meshxds.als import AccessLogServer, StreamIdentity

log = logging.getLogger(__name__)


class AgentFlows:
    def __init__(self, node: str, state: ClusterState | None, capacity: int = DEFAULT_CAPACITY,
                 als_listen: str | None = None, on_problem: Callable[[str, str], None] | None = None) -> None:
        self.store = FlowStore(capacity)
        self.resolver = EndpointResolver(state, node)
        self.istio = IstioMetrics(self.resolver.is_local)
        self.store.add_observer(self.istio.observe)
        self.envoy = EnvoyFlows(self.store, self.resolver, on_problem)
        self.als_listen = als_listen
        self.tunnels = InboundTunnels()  # who is behind each stream the node Envoy delivers (for revocation)
        self.als = AccessLogServer(self._on_als_message) if als_listen else None
        self.kernel: KernelFlows | None = None  # the eBPF ring buffer's reader (attach_kernel)
        self._stop = threading.Event()
        self.streams = FlowStreams(self.store, self._stop)
        self.registry = CollectorRegistry()
        self.registry.register(_FlowCollector(self))

    # --- the producers' side ------------------------------------------------------------------
    def record(self, flow: Flow) -> None:
        self.store.append(flow)

    def record_many(self, flows: Iterable[Flow]) -> None:
        self.store.extend(flows)

    def attach_kernel(self, pin_dir: Path, l7_listeners: Callable[[], set[str]],
                      rule_name: Callable[[int], str] = str) -> None:
        """Read the kernel's flows from the instance pinned in `pin_dir` once started."""
        self.kernel = KernelFlows(pin_dir, self.resolver, self.record_many, l7_listeners, rule_name)

    def _on_als_message(self, ident: StreamIdentity, msg: als_pb2.StreamAccessLogsMessage) -> None:
        self.envoy.on_message(ident, msg)
        self.tunnels.on_message(ident, msg)

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.kernel is not None:
            self.kernel.start()
        if self.als is not None and self.als_listen is not None:
            try:
                bound = self.als.start(self.als_listen)
            except RuntimeError as e:
                raise UserError(f"--als-listen {self.als_listen}: {e}; give a free HOST:PORT or a "
                                "unix:PATH in an existing folder") from None
            log.info("event=als_started address=%s", bound)

    def stop(self) -> None:
        self._stop.set()
        if self.kernel is not None:
            self.kernel.stop()
        self.store.close()
        if self.als is not None:
            self.als.stop()

    def alive(self) -> bool:
        return (self.als is None or self.als.alive()) and (self.kernel is None or self.kernel.alive())

    # --- serving ------------------------------------------------------------------------------
    def serve_http(self, handler: BaseHTTPRequestHandler) -> None:
        """GET /flows (see accel/flows_http.py)."""
        self.streams.serve(handler)

    def metrics_text(self) -> bytes:
        return self.istio.render() + generate_latest(self.registry)

    def status(self) -> dict[str, Any]:
        als = self.als.status() if self.als is not None else None
        return {
            **self.store.stats(),
            "streams_open": self.streams.open_streams,
            "istio_series": self.istio.series(),
            "kernel": None if self.kernel is None else {"read": self.kernel.read, **self.kernel.counters()},
            "access_log": None if als is None else {
                "address": als.address, "streams": als.streams, "messages": als.messages,
                "malformed_messages": als.malformed_messages, **self.envoy.status()},
            "inbound_tunnels": None if als is None else self.tunnels.status(),
        }


class _FlowCollector(Collector):
    """meshaccel_* health of the flow pipeline, read at scrape time (nothing on the hot path)."""

    def __init__(self, flows: AgentFlows) -> None:
        self.flows = flows

    def collect(self) -> Iterator[Any]:
        f = self.flows
        st = f.store.stats()
        yield GaugeMetricFamily("meshaccel_flows_kept", "Flows in the agent's store", value=st["kept"])
        yield CounterMetricFamily("meshaccel_flows", "Flows recorded by the agent", value=st["appended"])
        yield CounterMetricFamily("meshaccel_flow_subscriber_drops",
                                  "Flows dropped for /flows readers that fell behind", value=st["subscriber_drops"])
        yield GaugeMetricFamily("meshaccel_flow_streams", "Open /flows streams", value=f.streams.open_streams)
        if f.kernel is not None:
            events = CounterMetricFamily("meshaccel_flow_events", "Flow events of the eBPF programs: emitted, or "
                                         "dropped because the ring buffer was full", labels=["result"])
            for name, n in f.kernel.counters().items():
                events.add_metric([name], n)
            yield events
        if f.als is not None:
            als, env = f.als.status(), f.envoy.status()
            entries = CounterMetricFamily("meshaccel_access_log_entries",
                                          "Envoy access log entries received, by what became of them",
                                          labels=["result"])
            entries.add_metric(["flow"], env["flows"])
            entries.add_metric(["malformed"], env["malformed_entries"])
            entries.add_metric(["skipped"], env["skipped_entries"])
            yield entries
            yield CounterMetricFamily("meshaccel_access_log_malformed_messages",
                                      "Envoy access log messages that did not parse", value=als.malformed_messages)
            yield GaugeMetricFamily("meshaccel_access_log_streams", "Open access log streams from Envoy",
                                    value=als.streams)
