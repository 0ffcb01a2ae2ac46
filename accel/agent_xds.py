"""The agent's xDS bridge: the model's L7 services (and mTLS inbound listeners) as one snapshot for
this node's Envoy, served by our ADS server.

Any change to Services, EndpointSlices, HTTPRoutes or workloads (and every new SVID) marks the
snapshot dirty; one worker thread recomputes it with `accel.translate` (a pure function of the model,
so no incremental bookkeeping) and sets it in the cache when its content version changed. Coalescing
in the worker keeps the apply loop free of translation cost.

Listener addresses: every L7 (service, port) and every inbound (pod IP, port) gets a port of its own
on `bind_ip`, from `port_base` up, kept as long as it exists (so an unrelated change never moves a
listener). The connect hook that sends a ClusterIP's connections there is the service LB's job.

Inbound mTLS (a stand-in until HBONE lands): each mTLS-enrolled pod on this node (strict or
permissive), for each port its EndpointSlices name, gets a TLS listener serving the pod's SVID (SDS)
that forwards HTTP to the pod. Client certificates are checked against the trust bundle when sent.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from envoy.config.route.v3 import route_components_pb2

from accel.agent_certs import CertsReconciler, wants_certificate
from accel.state.model import ChangeSet, EndpointSlice, HTTPRoute, Kind, MtlsMode, Service, ServicePort
from accel.state.store import ClusterState
from accel.translate import L7Options, translate
from xds import resources as R
from xds.cache import LISTENER, SHORT_NAMES, Resources, SnapshotCache, snapshot_of
from xds.sds import build_secrets, trust_name
from xds.server import XdsServer

log = logging.getLogger(__name__)

L7_KINDS = frozenset({Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.HTTP_ROUTE})
DEFAULT_PORT_BASE = 15100


class ListenerPorts:
    """Sticky port per listener key: assigned on first sight, freed when the key is gone."""

    def __init__(self, base: int) -> None:
        self.base = base
        self._ports: dict[str, int] = {}
        self._seen: set[str] = set()

    def get(self, key: str) -> int:
        self._seen.add(key)
        port = self._ports.get(key)
        if port is None:
            used = set(self._ports.values())
            port = next(p for p in range(self.base, 65536) if p not in used)
            self._ports[key] = port
        return port

    def sweep(self) -> None:
        """Free the ports of keys not asked for since the last sweep."""
        self._ports = {k: p for k, p in self._ports.items() if k in self._seen}
        self._seen = set()

    def items(self) -> dict[str, int]:
        return dict(self._ports)


L7Target = tuple[str, str, int]  # (namespace, service, service port)


class XdsBridge:
    """`on_targets` (if given) learns where each L7 service port's Envoy listener is, for the service
    LB to send ClusterIP connections there: new and moved listeners only once Envoy has ACKed them
    (until then connections keep going straight to the endpoints), withdrawn ones before Envoy is
    told to drop them. So a service becoming L7, or ceasing to be, never refuses a connection."""

    def __init__(self, node: str, state: ClusterState, certs: CertsReconciler | None, bind_ip: str,
                 port_base: int, on_problem: Callable[[str, str], None],
                 on_targets: Callable[[dict[L7Target, tuple[str, int]]], None] | None = None) -> None:
        self.node = node
        self.state = state
        self.certs = certs
        self.bind_ip = bind_ip
        self.ports = ListenerPorts(port_base)
        self.on_problem = on_problem
        self.cache = SnapshotCache()
        self.server = XdsServer(self.cache)
        self.version = ""
        self.builds = 0
        self.last_build_seconds = 0.0
        self.listeners: dict[str, str] = {}  # what each listener serves -> its address
        self.problems: tuple[str, ...] = ()
        self.on_targets = on_targets
        self.targets: dict[L7Target, tuple[str, int]] = {}  # published to the service LB
        self._pending: tuple[str, dict[L7Target, tuple[str, int]]] | None = None  # (version, targets)
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, address: str) -> str:
        bound = self.server.start(address)
        if self.certs is not None:
            self.certs.manager.subscribe(lambda _sid, _svid: self._dirty.set())
            self.certs.manager.subscribe_bundle(lambda _pem: self._dirty.set())
        self._thread = threading.Thread(target=self._loop, name="agent-xds", daemon=True)
        self._thread.start()
        return bound

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(10)
        self.server.stop()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_change(self, cs: ChangeSet) -> None:
        if cs.synced or cs.workloads or any(c.key.kind in L7_KINDS for c in cs.changes):
            self._dirty.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(0.1 if self._pending is not None else None)
            if self._stop.is_set():
                return
            try:
                self._publish_if_acked()
                if not self._dirty.is_set():
                    continue
                self._dirty.clear()
                if not self.state.synced:
                    continue  # a partial model would withdraw config Envoy already serves; the sync batch re-marks
                self.rebuild()
            except Exception:  # a bug must not stop xDS for the next change; logged and counted
                log.exception("event=xds_rebuild_failed node=%s", self.node)
                self.on_problem("xds_rebuild_failed", f"node={self.node} snapshot rebuild failed (see log)")

    # --- the snapshot -------------------------------------------------------------------------
    def rebuild(self) -> bool:
        """Recompute the snapshot from the model; set it if it differs. True when a new one was set."""
        t0 = time.perf_counter()
        services = [r for r in self.state.records(Kind.SERVICE).values() if isinstance(r, Service)]
        slices = [r for r in self.state.records(Kind.ENDPOINT_SLICE).values() if isinstance(r, EndpointSlice)]
        routes = [r for r in self.state.records(Kind.HTTP_ROUTE).values() if isinstance(r, HTTPRoute)]
        listeners: dict[str, str] = {}
        targets: dict[L7Target, tuple[str, int]] = {}

        def l7_address(svc: Service, port: ServicePort) -> tuple[str, int]:
            p = self.ports.get(f"l7|{svc.namespace}|{svc.name}|{port.port}")
            listeners[f"{svc.namespace}/{svc.name}:{port.port}"] = f"{self.bind_ip}:{p}"
            targets[(svc.namespace, svc.name, port.port)] = (self.bind_ip, p)
            return self.bind_ip, p

        res = translate(services, slices, routes, L7Options(listener_address=l7_address))
        secret_names: list[str] = []
        if self.certs is not None:
            res = self._add_inbound(res, slices, listeners, secret_names)
        self.ports.sweep()
        secrets = build_secrets(secret_names, self.certs.secret_source) if self.certs is not None else []
        snap = snapshot_of(res, secrets)
        if res.problems != self.problems:
            for p in set(res.problems) - set(self.problems):
                self.on_problem("xds_translate", p)
            self.problems = res.problems
        self.listeners = listeners
        self.last_build_seconds = time.perf_counter() - t0
        if snap.version == self.version:
            return False
        # Withdraw first what this snapshot drops or moves; announce the rest once Envoy has it.
        kept = {k: v for k, v in self.targets.items() if targets.get(k) == v}
        if kept != self.targets:
            self._publish(kept)
        self._pending = (snap.version, targets) if targets != kept else None
        self.cache.set_snapshot(self.node, snap)
        self.version = snap.version
        self.builds += 1
        log.info("event=xds_snapshot node=%s version=%s listeners=%d clusters=%d secrets=%d seconds=%.4f",
                 self.node, snap.version, len(res.listeners), len(res.clusters), len(secrets),
                 self.last_build_seconds)
        return True

    def _publish(self, targets: dict[L7Target, tuple[str, int]]) -> None:
        self.targets = targets
        if self.on_targets is not None:
            self.on_targets(dict(targets))

    def _publish_if_acked(self) -> None:
        """Announce pending listeners once this node's Envoy has ACKed the snapshot holding them."""
        if self._pending is None:
            return
        version, targets = self._pending
        for stream in self.server.status().streams:
            if stream.node_id != self.node or stream.settled_version != version:
                continue
            lds = next((t for t in stream.types if t.type_url == LISTENER), None)
            if lds is not None and lds.version_acked == version:
                self._pending = None
                self._publish(targets)
                return

    def _add_inbound(self, res: Resources, slices: list[EndpointSlice], listeners: dict[str, str],
                     secret_names: list[str]) -> Resources:
        assert self.certs is not None
        enrolled: dict[str, str] = {}  # pod IP -> SPIFFE ID, for enrolled local pods that have a cert
        for w in self.state.workloads():
            if not wants_certificate(w, self.node) or w.mtls is MtlsMode.DISABLE:
                continue
            if self.certs.secret_source(w.identity.spiffe_id) is None:
                continue  # no SVID yet: a listener now would only sit warming
            for ip in w.pod.ips:
                enrolled[ip] = w.identity.spiffe_id
        targets = sorted({(ip, p.port) for sl in slices for ep in sl.endpoints for ip in ep.addresses
                          if ip in enrolled for p in sl.ports if p.protocol == "TCP" and p.port is not None})
        extra_l, extra_r, extra_c, extra_e = [], [], [], []
        for ip, port in targets:
            sid = enrolled[ip]
            name = f"inbound|{ip}|{port}"
            lport = self.ports.get(name)
            listeners[f"inbound {ip}:{port} {sid}"] = f"{self.bind_ip}:{lport}"
            extra_l.append(R.http_listener(name, self.bind_ip, lport, name, tls_certificate=sid,
                                           validation_context=trust_name(sid)))
            extra_r.append(R.route_config(name, [route_components_pb2.Route(
                match=R.route_match(), route=R.route_action([(name, 1)]))]))
            extra_c.append(R.eds_cluster(name))
            extra_e.append(R.load_assignment(name, [R.Backend(ip, port)]))
            secret_names.append(sid)
        return dataclasses.replace(res, clusters=res.clusters + tuple(extra_c),
                                   endpoints=res.endpoints + tuple(extra_e),
                                   listeners=res.listeners + tuple(extra_l), routes=res.routes + tuple(extra_r))

    # --- status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        st = self.server.status()
        rejected = []
        for s in st.streams:
            for t in s.types:
                # Still rejected: the last response was NACKed and nothing newer was ACKed since.
                if t.nacks and not t.awaiting_ack and t.version_acked != t.version_sent:
                    rejected.append({"node": s.node_id, "type": SHORT_NAMES.get(t.type_url, t.type_url),
                                     "version": t.version_sent, "error": t.last_error})
        return {
            "address": st.address,
            "node_id": self.node,
            "snapshot_version": self.version,
            "snapshot_builds": self.builds,
            "last_build_seconds": self.last_build_seconds,
            "streams": [{"node": s.node_id, "api": s.api, "settled_version": s.settled_version} for s in st.streams],
            "listeners": dict(sorted(self.listeners.items())),
            "nacks_total": st.nacks_total,
            "rejected": rejected,
            "recent_nacks": [{"node": n.node_id, "type": SHORT_NAMES.get(n.type_url, n.type_url), "version": n.version,
                              "error": n.error, "at": n.at} for n in st.recent_nacks[-5:]],
            "problems": list(self.problems),
        }
