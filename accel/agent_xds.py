"""The agent's xDS bridge: the model's L7 services and this node's HBONE listeners as one snapshot for
this node's Envoy, served by our ADS server.

Any change to Services, EndpointSlices, HTTPRoutes or workloads (and every new SVID) marks the
snapshot dirty; one worker thread recomputes it with `accel.translate` and `accel.mesh_xds` (pure
functions of the model, so no incremental bookkeeping) and sets it in the cache when its content
version changed. Coalescing in the worker keeps the apply loop free of translation cost.

L7 listener addresses: every L7 (service, port) gets a port of its own on `bind_ip`, from `port_base`
up, kept as long as it exists (so an unrelated change never moves a listener). The connect hook that
sends a ClusterIP's connections there is the service LB's job.

HBONE (transparent mTLS): every enrolled pod of this node whose SVID is issued and whose network
namespace is known gets its capture and inbound listeners inside its namespace (accel/mesh_xds.py).

What the kernel may rely on is announced (`on_announce`) only once Envoy has ACKed it: the L7 listener
behind a ClusterIP, the capture listener of a pod. What a new snapshot drops or moves is withdrawn
before Envoy is told. So a service becoming L7, or a pod becoming enrolled, never refuses a connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2

from accel.agent_certs import CertsReconciler, wants_certificate
from accel.mesh import sends_hbone
from accel.mesh_xds import MeshPod, baggage_of, mesh_resources
from accel.podns import PodNetnsCache
from accel.state.model import (
    ChangeSet,
    EndpointSlice,
    HTTPRoute,
    Kind,
    ObjectKey,
    Service,
    ServicePort,
    Workload,
)
from accel.state.store import ClusterState
from accel.translate import L7Options, translate
from meshxds import resources as R
from meshxds.access_log import als_cluster, attach, http_access_log, tcp_access_log
from meshxds.cache import LISTENER, SHORT_NAMES, Resources, SnapshotCache, snapshot_of
from meshxds.hbone import PortRule
from meshxds.sds import build_secrets
from meshxds.server import XdsServer

log = logging.getLogger(__name__)

L7_KINDS = frozenset({Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.HTTP_ROUTE})
# What the HBONE listeners' RBAC is made of.
POLICY_KINDS = frozenset({Kind.NETWORK_POLICY, Kind.AUTHORIZATION_POLICY, Kind.NAMESPACE})
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


@dataclass(frozen=True, slots=True)
class Announcement:
    """What the kernel may rely on in this node's Envoy: the listener of each L7 service port (the service
    LB sends the ClusterIP there), and the pods whose capture listener is up (connect() captures theirs)."""

    l7_targets: Mapping[L7Target, tuple[str, int]] = field(default_factory=dict)
    capture: frozenset[ObjectKey] = frozenset()

    def kept_in(self, other: Announcement) -> Announcement:
        """What of self stays true under `other` (withdrawn first, before Envoy drops it)."""
        return Announcement({k: v for k, v in self.l7_targets.items() if other.l7_targets.get(k) == v},
                            self.capture & other.capture)


class XdsBridge:
    """`on_announce` (if given) learns what the kernel may send to Envoy (see Announcement): new things only
    once Envoy has ACKed the snapshot holding them, withdrawn things before Envoy is told to drop them."""

    def __init__(self, node: str, state: ClusterState, certs: CertsReconciler | None, bind_ip: str,
                 port_base: int, on_problem: Callable[[str, str], None],
                 on_announce: Callable[[Announcement], None] | None = None,
                 netns: PodNetnsCache | None = None, trust_domain: str = "cluster.local",
                 access_log_path: str | None = None, als_address: str | None = None,
                 rbac_of: Callable[[Workload], tuple[PortRule, ...] | None] = lambda _w: None) -> None:
        self.node = node
        self.state = state
        self.certs = certs
        self.bind_ip = bind_ip
        self.ports = ListenerPorts(port_base)
        self.on_problem = on_problem
        self.netns = netns
        self.trust_domain = trust_domain
        self.rbac_of = rbac_of  # the HBONE inbound's policy of a pod (the agent's policy compiler)
        # Access logs: a JSON file (--envoy-access-log) and/or the agent's ALS server (--als-listen: flows).
        files = [R.file_access_log(access_log_path)] if access_log_path else []
        self.als_cluster = als_cluster(als_address) if als_address else None
        self.file_log = files
        # `forwarded` names the source pod (believed when its identity is the certificate's: accel/flows_envoy.py)
        self.inbound_log = files + ([http_access_log("tunnel", "inbound", request_headers=("forwarded",))]
                                    if als_address else [])
        self.als = als_address is not None
        self.cache = SnapshotCache()
        self.server = XdsServer(self.cache)
        self.version = ""
        self.builds = 0
        self.last_build_seconds = 0.0
        self.listeners: dict[str, str] = {}  # what each listener serves -> its address
        self.mesh_pods: dict[str, str] = {}  # enrolled pod -> its SPIFFE ID, in the last snapshot
        self.problems: tuple[str, ...] = ()
        self.on_announce = on_announce
        self.announced = Announcement()
        self._pending: tuple[str, Announcement] | None = None  # (snapshot version, to announce once ACKed)
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # rebuild (bridge thread) against adopt (apply thread)
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
        if cs.synced or cs.workloads or any(c.key.kind in L7_KINDS | POLICY_KINDS for c in cs.changes):
            self._dirty.set()

    def adopt(self, already: Announcement) -> None:
        """What the kernel already relies on when we start (left by the previous agent, whose Envoy config
        outlived it): withdrawn like anything else if our first snapshot drops it."""
        with self._lock:
            if not self.builds:
                self.announced = already

    def poke(self) -> None:
        """Something outside the model changed (a pod's namespace was found): rebuild."""
        self._dirty.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(0.1 if self._pending is not None else None)
            if self._stop.is_set():
                return
            try:
                self._announce_if_acked()
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
        with self._lock:
            return self._rebuild()

    def _rebuild(self) -> bool:
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
        self.ports.sweep()
        mesh_pods = self._mesh_pods()
        mesh, secret_names = mesh_resources(mesh_pods, self.trust_domain, self._outbound_log, self.inbound_log)
        for p in mesh_pods:
            listeners[f"capture {p.key.namespace}/{p.key.name}"] = "127.0.0.1:15001 (in the pod)"
            listeners[f"hbone {p.key.namespace}/{p.key.name} {p.spiffe_id}"] = ", ".join(f"{ip}:15008" for ip in p.ips)
        l7_listeners = res.listeners
        if self.als:  # each L7 listener's requests are flows of its service (name: l7|<ns>|<svc>|<port>)
            l7_listeners = tuple(attach(lis, http=http_access_log("l7", "outbound", "/".join(lis.name.split("|")[1:3])))
                                 for lis in res.listeners)
        extra = (self.als_cluster,) if self.als_cluster is not None else ()
        res = Resources(res.clusters + mesh.clusters + extra, res.endpoints, l7_listeners + mesh.listeners,
                        res.routes + mesh.routes, res.problems)
        secrets = build_secrets(secret_names, self.certs.secret_source) if self.certs is not None else []
        snap = snapshot_of(res, secrets)
        if res.problems != self.problems:
            for text in set(res.problems) - set(self.problems):
                self.on_problem("xds_translate", text)
            self.problems = res.problems
        self.listeners = listeners
        self.mesh_pods = {f"{p.key.namespace}/{p.key.name}": p.spiffe_id for p in mesh_pods}
        self.last_build_seconds = time.perf_counter() - t0
        if snap.version == self.version:
            return False
        # Withdraw first what this snapshot drops or moves; announce the rest once Envoy has it.
        wanted = Announcement(targets, frozenset(p.key for p in mesh_pods))
        kept = self.announced.kept_in(wanted)
        if kept != self.announced:
            self._announce(kept)
        self._pending = (snap.version, wanted) if wanted != kept else None
        self.cache.set_snapshot(self.node, snap)
        self.version = snap.version
        self.builds += 1
        log.info("event=xds_snapshot node=%s version=%s listeners=%d clusters=%d secrets=%d seconds=%.4f",
                 self.node, snap.version, len(res.listeners), len(res.clusters), len(secrets),
                 self.last_build_seconds)
        return True

    def _outbound_log(self, pod: MeshPod) -> list[accesslog_pb2.AccessLog]:
        """A pod's capture listener: its flows start at the pod (not at its loopback) and end where the app
        was going (not at the HBONE hop), with the server's identity from its certificate."""
        if not self.als:
            return list(self.file_log)
        source = next((ip for ip in pod.ips if ":" not in ip), pod.ips[0])
        return [*self.file_log, tcp_access_log("tunnel", "outbound", upstream_peer=True, source_ip=source,
                                               original_destination=True)]

    def _mesh_pods(self) -> list[MeshPod]:
        """Enrolled pods of this node that can have their listeners now: SVID issued, namespace known."""
        if self.certs is None or self.netns is None:
            return []
        out = []
        for w in self.state.workloads():
            if not (wants_certificate(w, self.node) and sends_hbone(w)) or not w.pod.ips:
                continue
            if self.certs.secret_source(w.identity.spiffe_id) is None:
                continue  # no SVID yet: a listener now would only sit warming
            ns = self.netns.get(w.pod)
            if ns is None:
                continue  # the local_pods reconciler retries and pokes us when found
            out.append(MeshPod(w.key, w.pod.ips, w.identity.spiffe_id, ns.path, baggage_of(w), self.rbac_of(w)))
        return out

    def _announce(self, a: Announcement) -> None:
        self.announced = a
        if self.on_announce is not None:
            self.on_announce(a)

    def _announce_if_acked(self) -> None:
        """Announce pending listeners once this node's Envoy has ACKed the snapshot holding them."""
        if self._pending is None:
            return
        version, wanted = self._pending
        for stream in self.server.status().streams:
            if stream.node_id != self.node or stream.settled_version != version:
                continue
            lds = next((t for t in stream.types if t.type_url == LISTENER), None)
            if lds is not None and lds.version_acked == version:
                self._pending = None
                self._announce(wanted)
                return

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
            "mesh_pods": dict(sorted(self.mesh_pods.items())),
            "problems": list(self.problems),
        }
