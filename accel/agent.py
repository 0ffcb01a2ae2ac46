"""The node agent: one source feeds one state model; reconcilers follow the model's changes.

Threads: the source (its own watch threads), the apply loop (the model's single writer; it batches
whatever is queued, applies it and lets the reconcilers write the maps), and the HTTP endpoint
(/healthz, /readyz, /metrics, /status). Nothing here blocks on the kernel or the API server while
holding the model.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from accel.metrics import Metrics
from accel.reconcile import LocalEndpointsReconciler
from accel.sources.base import Source
from accel.state.identity import DEFAULT_TRUST_DOMAIN
from accel.state.model import Event, Kind, MtlsMode
from accel.state.store import ClusterState

log = logging.getLogger(__name__)

MAX_BATCH = 5000
_SYNCED = object()
# Problems that are failures of the path to the cluster, not bad input.
TRANSIENT = frozenset({"watch_failed", "watch_garbled", "apiserver_unreachable", "manifest_folder_unreadable", "watch_unknown_event"})


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str
    state_dir: Path | None = None
    listen: tuple[str, int] | None = None  # None: no HTTP endpoint (tests, benchmarks)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    default_mtls: MtlsMode = MtlsMode.DISABLE


class _QueueSink:
    """The Sink the source feeds: events go to the apply loop's queue, problems to logs and metrics."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def event(self, ev: Event) -> None:
        self._agent._queue.put((ev, time.monotonic()))

    def synced(self) -> None:
        self._agent._queue.put((_SYNCED, time.monotonic()))

    def problem(self, reason: str, message: str) -> None:
        self._agent.report_problem(reason, message)

    def stat(self, name: str, kind: str) -> None:
        self._agent.metrics.source_ops.labels(name, kind).inc()


class Agent:
    def __init__(self, config: AgentConfig, source: Source, local_endpoints: MutableMapping[str, int], *,
                 reconciler: type[LocalEndpointsReconciler] = LocalEndpointsReconciler) -> None:
        self.config = config
        self.source = source
        self.metrics = Metrics()
        self.state = ClusterState(trust_domain=config.trust_domain, default_mtls=config.default_mtls,
                                  state_dir=config.state_dir, on_problem=self.report_problem)
        self.reconciler = reconciler(config.node, local_endpoints, self.metrics)
        self.reconciler.state = self.state
        self.state.subscribe(self.reconciler.on_change)
        self._queue: queue.SimpleQueue[tuple[object, float]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http: ThreadingHTTPServer | None = None
        self.started_at = time.monotonic()
        self.ready_seconds: float | None = None
        self.last_event_at: float | None = None
        self.events_applied = 0
        self.lag_seconds = 0.0  # age of the oldest event in the batch being applied
        self._problems_lock = threading.Lock()
        self._last_problem_log: dict[str, float] = {}

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Agent:
        self.started_at = time.monotonic()
        sink = _QueueSink(self)
        self._spawn("source", lambda: self.source.run(sink, self._stop))
        self._spawn("apply", self._apply_loop)
        if self.config.listen is not None:
            self._http = _serve(self, self.config.listen)
            self._spawn("http", self._http.serve_forever)
        log.info("event=agent_started node=%s source=%s listen=%s", self.config.node, self.source.name,
                 self.address or "-")
        return self

    def _spawn(self, name: str, fn: Any) -> None:
        t = threading.Thread(target=fn, name=f"agent-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for t in self._threads:
            t.join(10)
        log.info("event=agent_stopped node=%s", self.config.node)

    def request_stop(self) -> None:
        """Signal-safe: ask the agent to stop; wait() returns."""
        self._stop.set()

    def wait(self) -> None:
        """Block until stopped (the CLI's main thread)."""
        while not self._stop.wait(1.0):
            pass

    @property
    def address(self) -> str | None:
        if self._http is None:
            return None
        host, port = self._http.server_address[:2]
        return f"{host!s}:{port}"

    def healthy(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    # --- problems -----------------------------------------------------------------------------

    def report_problem(self, reason: str, message: str) -> None:
        """Bad input or a transient failure: counted always, logged at most once a second per reason."""
        if reason in TRANSIENT:
            self.metrics.errors.labels("source", reason).inc()
        else:
            self.metrics.bad_input.labels(reason).inc()
        now = time.monotonic()
        with self._problems_lock:
            if now - self._last_problem_log.get(reason, -10.0) < 1.0:
                return
            self._last_problem_log[reason] = now
        log.warning("event=problem reason=%s %s", reason, message)

    # --- the apply loop -----------------------------------------------------------------------

    def _apply_loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                self.lag_seconds = 0.0
                self.metrics.sync_lag.set(0)
                continue
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self.lag_seconds = time.monotonic() - first[1]
            self.metrics.sync_lag.set(self.lag_seconds)
            try:
                self._apply_batch(batch)
            except Exception:  # a bug must not stop the agent following the cluster; it is logged and counted
                log.exception("event=apply_failed batch=%d", len(batch))
                self.metrics.errors.labels("apply", "exception").inc()

    def _apply_batch(self, batch: list[tuple[object, float]]) -> None:
        t0 = time.perf_counter()
        events: list[Event] = []
        counts: dict[tuple[str, str], int] = {}
        for item, _ in batch:
            if item is _SYNCED:
                self.state.apply(events, synced=True)
                events = []
                if not self.ready.is_set():
                    self.ready_seconds = time.monotonic() - self.started_at
                    self.ready.set()
                    self.metrics.ready.set(1)
                    log.info("event=ready node=%s seconds=%.3f objects=%s", self.config.node, self.ready_seconds,
                             json.dumps({str(k): v for k, v in self.state.counts().items()}))
            elif isinstance(item, Event):
                events.append(item)
                ck = (item.record.kind, item.type)
                counts[ck] = counts.get(ck, 0) + 1
        if events:
            self.state.apply(events)
        for (kind, type_), n in counts.items():
            self.metrics.events.labels(kind, type_).inc(n)
        self.events_applied += len(batch)
        self.last_event_at = time.time()
        self.metrics.reconcile_seconds.observe(time.perf_counter() - t0)
        for kind, n in self.state.counts().items():
            self.metrics.objects.labels(kind).set(n)

    # --- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        counts = self.state.counts()
        return {
            "node": self.config.node,
            "source": self.source.name,
            "ready": self.ready.is_set(),
            "synced": self.state.synced,
            "ready_seconds": self.ready_seconds,
            "events_applied": self.events_applied,
            "last_event_unix": self.last_event_at,
            "lag_seconds": self.lag_seconds,
            "objects": {str(k): counts[k] for k in Kind},
            "local_endpoints": len(self.reconciler.desired()),
            "healthy": self.healthy(),
        }


def _serve(agent: Agent, listen: tuple[str, int]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok = agent.healthy()
                self._send(200 if ok else 500, b"ok\n" if ok else b"a worker thread died\n")
            elif path == "/readyz":
                ok = agent.ready.is_set()
                self._send(200 if ok else 503, b"ready\n" if ok else b"initial sync not applied yet\n")
            elif path == "/metrics":
                self._send(200, agent.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/status":
                self._send(200, json.dumps(agent.status()).encode(), "application/json")
            else:
                self._send(404, b"not found: try /healthz /readyz /metrics /status\n")

    httpd = ThreadingHTTPServer(listen, Handler)
    httpd.daemon_threads = True
    return httpd
