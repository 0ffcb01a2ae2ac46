"""The node agent: one source feeds one state model; reconcilers follow the model's changes.

Threads: the source (its own watch threads), the apply loop (the model's single writer; it batches
whatever is queued, applies it and lets the reconcilers write the maps), and the HTTP endpoint
(/healthz, /readyz, /metrics, /status, /flows). Nothing here blocks on the kernel or the API server while
holding the model. Optional parts follow the same model: the cert manager (its own refresh thread)
and the xDS bridge (its own rebuild thread and the ADS server's loop).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from accel.agent_certs import CertsReconciler
from accel.agent_flows import AgentFlows
from accel.agent_xds import DEFAULT_PORT_BASE, Announcement, XdsBridge
from accel.events import EventReporter
from accel.flows import DEFAULT_CAPACITY
from accel.mesh import IpcacheReconciler, LocalPodsReconciler, MeshTables
from accel.mesh_xds import port_rules
from accel.metrics import Metrics
from accel.podns import PodNetnsCache
from accel.policy import PolicyCompiler, PolicyOptions
from accel.policy_agent import DenyCounters, PolicyEnforcer, PolicyExplainer, PolicyTables, Revoker
from accel.reconcile import LocalEndpointsReconciler, on_node
from accel.servicelb import LbTables, ServiceLBReconciler
from accel.sources.base import Source
from accel.splice_guard import SpliceGuard
from accel.state.identity import DEFAULT_TRUST_DOMAIN
from accel.state.model import ChangeSet, Event, Kind, MtlsMode, ObjectKey, Pod, Workload
from accel.state.store import ClusterState
from certs.manager import CertManager
from meshxds.hbone import PortRule
from sockops_bpf.layout import IDENTITY_HOST

log = logging.getLogger(__name__)

MAX_BATCH = 5000
IDLE_RETRY_SECONDS = 1.0
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
    xds_listen: str | None = None  # "HOST:PORT" or "unix:PATH"; None: no xDS server
    l7_bind: str = "127.0.0.1"  # where this node's Envoy listens for L7 services and inbound mTLS
    l7_port_base: int = DEFAULT_PORT_BASE
    service_cidrs: tuple[str, ...] = ()  # the cluster's service ranges: a VIP there with no service is refused
    # This node's own addresses toward its pods (the node Envoy's upstream connections, kubelet probes):
    # HOST in ipcache, and spliced with local pods as proxy legs (small exchanges only, maps.h).
    node_addresses: tuple[str, ...] = ()
    splice_loopback: bool = False  # loopback in local_endpoints: within a pod, and app <-> node Envoy capture legs
    envoy_access_log: str | None = None  # the node Envoy logs each tunnel here (JSON lines)
    istio_root_namespace: str = "istio-system"  # AuthorizationPolicies and PeerAuthentications here apply mesh-wide
    flows_kept: int = DEFAULT_CAPACITY  # the last N flows served by /flows (accel observe)
    als_listen: str | None = None  # "HOST:PORT" or "unix:PATH": Envoy's access log service; None: off
    splice_guard_pages: int | None = None  # TCP memory above which spliced senders move to TCP (None: default)


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
                 reconciler: type[LocalEndpointsReconciler] = LocalEndpointsReconciler,
                 cert_manager: CertManager | None = None, lb_tables: LbTables | None = None,
                 mesh_tables: MeshTables | None = None, policy_tables: PolicyTables | None = None,
                 flow_events: Path | None = None, splice_guard: Callable[[int], None] | None = None) -> None:
        """`flow_events`: the pin folder whose eBPF flow events the agent reads (None: no kernel flows);
        `splice_guard`: sets the kernel's splice budget (accel/splice_guard.py; None: no guard)."""
        self.config = config
        self.source = source
        self.metrics = Metrics()
        # Bad input is logged and counted always, and also reported on its object (a Kubernetes Event)
        # when the source is the API server.
        self.events: EventReporter | None = None
        api = getattr(source, "api", None)
        if source.name == "kube" and api is not None:
            self.events = EventReporter(api, host=config.node, uid_of=lambda k: getattr(self.state.get(k), "uid", ""))
        self.state = ClusterState(trust_domain=config.trust_domain, default_mtls=config.default_mtls,
                                  state_dir=config.state_dir, on_problem=self.report_problem,
                                  on_object_problem=self._object_event, root_namespace=config.istio_root_namespace)
        # Identity policy (accel/policy_agent.py): subscribed first, so a new identity's entries are in the
        # policy map before the ipcache starts naming addresses by it.
        self.policy = PolicyEnforcer(
            PolicyCompiler(PolicyOptions(trust_domain=config.trust_domain, root_namespace=config.istio_root_namespace,
                                         node=config.node), on_problem=self._object_problem),
            policy_tables, self.metrics, pod_owns=self._pod_owns)
        self.state.subscribe(self.policy.on_change)
        fixed = dict.fromkeys(config.node_addresses, IDENTITY_HOST)
        if config.splice_loopback:
            fixed.update({"127.0.0.1": 0, "::1": 0})
        self.reconciler = reconciler(config.node, local_endpoints, self.metrics, fixed)
        self.reconciler.state = self.state
        self.state.subscribe(self.reconciler.on_change)
        self.netns = PodNetnsCache()
        # The mesh (ipcache, local_pods): who is where and enrolled, for capture, strict inbound and policy.
        self.ipcache: IpcacheReconciler | None = None
        self.local_pods: LocalPodsReconciler | None = None
        if mesh_tables is not None:
            self.ipcache = IpcacheReconciler(config.node, mesh_tables.ipcache, self.metrics, config.node_addresses)
            self.ipcache.state = self.state
            self.state.subscribe(self.ipcache.on_change)
            self.local_pods = LocalPodsReconciler(config.node, mesh_tables.local_pods, self.netns, self.metrics)
            self.local_pods.state = self.state
            self.state.subscribe(self.local_pods.on_change)
        # Service load balancing (sock_lb.c): adopt what the maps hold (an agent restart keeps service
        # traffic flowing), then follow the model's Services and EndpointSlices.
        self.servicelb: ServiceLBReconciler | None = None
        if lb_tables is not None:
            self.servicelb = ServiceLBReconciler(config.node, lb_tables, self.metrics,
                                                 service_cidrs=config.service_cidrs,
                                                 netns_cookie_of=self._netns_cookie)
            self.servicelb.state = self.state
            self.servicelb.adopt()
            self.state.subscribe(self.servicelb.on_change)
        self.certs: CertsReconciler | None = None
        if cert_manager is not None:
            self.certs = CertsReconciler(config.node, cert_manager, self.report_problem)
            self.state.subscribe(self.certs.on_change)
        self.xds: XdsBridge | None = None
        if config.xds_listen is not None:
            def on_announce(a: Announcement) -> None:  # applied to the maps in the apply loop, in order
                self._queue.put((a, time.monotonic()))

            self.xds = XdsBridge(config.node, self.state, self.certs, config.l7_bind, config.l7_port_base,
                                 self.report_problem, on_announce, self.netns, config.trust_domain,
                                 config.envoy_access_log, config.als_listen, self._tunnel_rbac)
            if self.local_pods is not None:
                self.state.subscribe(self._seed_announcement)
            self.state.subscribe(self.xds.on_change)
        # Flows (accel/agent_flows.py): producers call self.flows.record(flow); served at /flows.
        self.flows = AgentFlows(config.node, self.state, config.flows_kept, config.als_listen, self.report_problem)
        if flow_events is not None:
            self.flows.attach_kernel(flow_events, self._l7_listeners, self.policy.rule_name)
        self.explainer = PolicyExplainer(self.policy, self.state, config.node,
                                         policy_tables.policy if policy_tables is not None else None,
                                         mesh_tables.ipcache if mesh_tables is not None else None)
        self.policy_registry = CollectorRegistry()
        if policy_tables is not None:
            self.policy_registry.register(DenyCounters(policy_tables.denies, self.policy))
        # Closing what a policy change no longer allows (netlink SOCK_DESTROY), in a thread of its own.
        self.revoker: Revoker | None = None
        if policy_tables is not None:
            self.revoker = Revoker(self.policy, self.state, config.node, self.netns,
                                   getattr(mesh_tables, "orig_dst", None), config.node_addresses,
                                   self._served_pods, self.metrics,
                                   self.flows.tunnels if config.als_listen else None)
            self.policy.on_revoke = self.revoker.wake
            self.flows.tunnels.on_open = self.revoker.check_tunnel
        # Spliced bytes have no flow control in the kernel: keep them from filling the node's TCP memory.
        self.splice_guard = (SpliceGuard(splice_guard, self.metrics.registry, config.splice_guard_pages)
                             if splice_guard is not None else None)
        self._queue: queue.SimpleQueue[tuple[object, float]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http: ThreadingHTTPServer | None = None
        self.started_at = time.monotonic()
        self._last_idle_retry = 0.0
        self.ready_seconds: float | None = None
        self.last_event_at: float | None = None
        self.events_applied = 0
        self.lag_seconds = 0.0  # age of the oldest event in the batch being applied
        self._problems_lock = threading.Lock()
        self._last_problem_log: dict[tuple[str, str], float] = {}

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Agent:
        self.started_at = time.monotonic()
        sink = _QueueSink(self)
        self.flows.start()
        if self.certs is not None:
            self.certs.manager.start()
        if self.events is not None:
            self.events.start()
        if self.revoker is not None:
            self.revoker.start()
        if self.splice_guard is not None:
            self.splice_guard.start()
        if self.xds is not None and self.config.xds_listen is not None:
            self.xds.start(self.config.xds_listen)
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
        self.flows.stop()  # ends /flows streams before the HTTP server goes
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for t in self._threads:
            t.join(10)
        if self.xds is not None:
            self.xds.stop()
        if self.certs is not None:
            self.certs.manager.stop()
        if self.revoker is not None:
            self.revoker.stop()
        if self.splice_guard is not None:
            self.splice_guard.stop()
        if self.events is not None:
            self.events.stop()
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
        return (all(t.is_alive() for t in self._threads) and (self.xds is None or self.xds.alive())
                and self.flows.alive() and (self.splice_guard is None or self.splice_guard.alive()))

    # --- problems -----------------------------------------------------------------------------

    def report_problem(self, reason: str, message: str) -> None:
        """Bad input or a transient failure: counted always, logged at most once a second per reason and
        object (the message's start names it), so one noisy object hides no other."""
        if reason in TRANSIENT:
            self.metrics.errors.labels("source", reason).inc()
        else:
            self.metrics.bad_input.labels(reason).inc()
        now = time.monotonic()
        key = (reason, message[:100])
        with self._problems_lock:
            if now - self._last_problem_log.get(key, -10.0) < 1.0:
                return
            if len(self._last_problem_log) > 10_000:
                self._last_problem_log.clear()
            self._last_problem_log[key] = now
        log.warning("event=problem reason=%s %s", reason, message)

    # --- the apply loop -----------------------------------------------------------------------

    def _apply_loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                self.lag_seconds = 0.0
                self.metrics.sync_lag.set(0)
                self._idle_work()
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

    def _l7_listeners(self) -> set[str]:
        """Where the node Envoy listens for L7 services (a kernel flow there is an L7 flow)."""
        if self.xds is None:
            return set()
        return {f"{ip}:{port}" for ip, port in self.xds.announced.l7_targets.values()}

    def _tunnel_rbac(self, w: Workload) -> tuple[PortRule, ...] | None:
        return port_rules(self.policy.rbac(w.security_identity))

    def _object_event(self, reason: str, key: ObjectKey, message: str) -> None:
        """Bad input on an object: an Event on it (in cluster); the log and count are report_problem's."""
        if self.events is not None:
            self.events.report(reason, key, message)

    def _object_problem(self, reason: str, key: ObjectKey, message: str) -> None:
        self.report_problem(reason, message)
        self._object_event(reason, key, message)

    def _pod_owns(self, cidr: str) -> bool:
        return self.ipcache is not None and cidr in self.ipcache.desired()

    def _served_pods(self) -> list[Workload]:
        return [w for w in self.state.workloads() if on_node(w, self.config.node)]

    def _seed_announcement(self, cs: ChangeSet) -> None:
        """At the first sync, after local_pods adopted the map: the pods captured before we started."""
        if cs.synced and self.xds is not None and self.local_pods is not None:
            self.xds.adopt(Announcement(capture=self.local_pods.capture_ready))

    def _netns_cookie(self, pod: Pod) -> int | None:
        ns = self.netns.get(pod)
        return ns.cookie if ns is not None else None

    def _idle_work(self) -> None:
        """Retries that no event would trigger, done in the apply thread (which owns the reconcilers):
        pods whose network namespace was not found yet (no process in their cgroup before)."""
        now = time.monotonic()
        if now - self._last_idle_retry < IDLE_RETRY_SECONDS:
            return
        self._last_idle_retry = now
        try:
            if self.servicelb is not None:
                self.servicelb.retry_skips()
            if self.local_pods is not None:
                missing = len(self.local_pods.unresolved)
                if self.local_pods.retry() < missing and self.xds is not None:
                    self.xds.poke()  # a namespace found: the bridge can add that pod's listeners now
        except Exception:  # logged and counted; the next idle round tries again
            log.exception("event=idle_retry_failed")
            self.metrics.errors.labels("agent", "idle_retry").inc()

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
            elif isinstance(item, Announcement):
                if events:  # in order: the model first, then what Envoy is ready for
                    self.state.apply(events)
                    events = []
                if self.servicelb is not None:
                    self.servicelb.set_l7_targets(dict(item.l7_targets))
                if self.local_pods is not None:
                    self.local_pods.set_capture_ready(item.capture)
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
            "ipcache": len(self.ipcache.desired()) if self.ipcache is not None else None,
            "local_pods": len(self.local_pods.written()) if self.local_pods is not None else None,
            "capture_ready": sorted(f"{k.namespace}/{k.name}" for k in self.local_pods.capture_ready)
            if self.local_pods is not None else None,
            "service_frontends": self.servicelb.frontend_count() if self.servicelb is not None else None,
            "healthy": self.healthy(),
            "certs": self.certs.status() if self.certs is not None else None,
            "xds": self.xds.status() if self.xds is not None else None,
            "flows": self.flows.status(),
            "revocation": {"closed": self.revoker.destroyed, "last_round_seconds": self.revoker.last_round_seconds}
            if self.revoker is not None else None,
            "splice_guard": {"budget_spent": self.splice_guard.up, "high_pages": self.splice_guard.high}
            if self.splice_guard is not None else None,
        }

    def policy_check(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """GET /policy/check?src=&dst=&port=&proto= (accel policy check)."""
        try:
            src, dst, port = query["src"][0], query["dst"][0], int(query["port"][0])
            proto = {"tcp": 6, "udp": 17, "sctp": 132}[query.get("proto", ["tcp"])[0].lower()]
        except (KeyError, IndexError, ValueError):
            return 400, {"error": "give src, dst (an IP or namespace/pod), port (a number) and proto (tcp|udp|sctp)"}
        if not 0 < port < 65536:
            return 400, {"error": f"port {port} is not 1..65535"}
        try:
            c = self.explainer.check(src, dst, port, proto)
        except ValueError as e:
            return 404, {"error": str(e)}
        return 200, dataclasses.asdict(c)

    def metrics_text(self) -> bytes:
        """The agent's registry, plus the process-wide one where the CSR client, cert and xDS
        counters live (NACKs by type, streams) when those parts run."""
        text = self.metrics.render() + self.flows.metrics_text() + generate_latest(self.policy_registry)
        if self.certs is not None or self.xds is not None:
            text += generate_latest(REGISTRY)
        return text


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
                self._send(200, agent.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/status":
                self._send(200, json.dumps(agent.status()).encode(), "application/json")
            elif path == "/flows":
                agent.flows.serve_http(self)
            elif path == "/policy/check":
                code, doc = agent.policy_check(parse_qs(urlsplit(self.path).query))
                self._send(code, json.dumps(doc).encode(), "application/json")
            else:
                self._send(404, b"not found: try /healthz /readyz /metrics /status /flows /policy/check\n")

        def do_POST(self) -> None:  # noqa: N802
            if self.path.split("?", 1)[0] != "/certs/refresh":
                self._send(404, b"not found: POST /certs/refresh\n")
            elif agent.certs is None:
                self._send(409, b"this agent runs no cert manager (start it with --ca-dir or --ca-address)\n")
            else:
                n = agent.certs.manager.refresh_all()
                self._send(202, json.dumps({"refreshing": n}).encode(), "application/json")

    httpd = ThreadingHTTPServer(listen, Handler)
    httpd.daemon_threads = True
    return httpd
