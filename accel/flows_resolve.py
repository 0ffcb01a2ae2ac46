"""From an address to a flow `Endpoint` (pod, workload, namespace, SPIFFE ID, labels) and from a
ClusterIP to its Service, read from the state model; used by every flow producer (Envoy's access
log here; the kernel's ring buffer too), so a flow names its ends the same way whoever saw it.

Workload names follow Istio's reading of a pod's owner; the model keeps no owner references, so the
owner is read back from the labels controllers put on their pods: `pod-template-hash` (a
Deployment's ReplicaSet: the pod name less its last two parts), `controller-revision-hash` (a
StatefulSet or DaemonSet: less its last part), `job-name`; else the `app` label, else the pod name.
"""

from __future__ import annotations

import threading

from accel.flows import Endpoint
from accel.state.model import Kind, Pod, Service
from accel.state.store import ClusterState

MAX_CACHED = 4096


def workload_name(pod: Pod) -> str:
    labels = pod.labels
    parts = pod.name.split("-")
    rs_hash = labels.get("pod-template-hash")
    if rs_hash and len(parts) >= 3 and parts[-2] == rs_hash:
        return "-".join(parts[:-2])
    if labels.get("controller-revision-hash") and len(parts) >= 2:
        return "-".join(parts[:-1])
    return labels.get("job-name") or labels.get("app") or pod.name


class EndpointResolver:
    """Thread-safe; answers from a cache dropped whenever the model changed (its generation)."""

    def __init__(self, state: ClusterState | None, node: str = "") -> None:
        self.state = state
        self.node = node
        self._lock = threading.Lock()
        self._generation = -1
        self._endpoints: dict[tuple[str, int], Endpoint] = {}  # shared by the flows of one (ip, port)
        self._pods: dict[str, Endpoint] = {}  # per address, port 0: what a fresh source port starts from
        self._services: dict[tuple[str, int], str] = {}
        self._services_any_port: dict[str, str] = {}

    def _fresh(self) -> None:
        """Under the lock: drop the caches if the model moved on."""
        gen = self.state.generation if self.state is not None else 0
        if len(self._endpoints) > MAX_CACHED:  # ephemeral source ports fill it; start over
            self._endpoints = {}
        if len(self._pods) > MAX_CACHED:
            self._pods = {}
        if gen != self._generation:
            self._generation = gen
            self._endpoints = {}
            self._pods = {}
            self._services = {}
            self._services_any_port = {}
            if self.state is not None:
                for rec in self.state.records(Kind.SERVICE).values():
                    if isinstance(rec, Service):
                        name = f"{rec.namespace}/{rec.name}"
                        for ip in rec.cluster_ips:
                            self._services_any_port[ip] = name
                            for p in rec.ports:
                                self._services[(ip, p.port)] = name

    def endpoint(self, ip: str, port: int) -> Endpoint:
        """What the model knows about `ip` (a bare Endpoint when nothing)."""
        key = (ip, port)
        with self._lock:
            self._fresh()
            ep = self._endpoints.get(key)
            if ep is not None:
                return ep
            base = self._pods.get(ip)
        if base is None:
            base = self._resolve(ip)
            with self._lock:
                self._pods[ip] = base
        ep = Endpoint(ip, port, base.pod, base.workload, base.namespace, base.identity, base.labels)
        with self._lock:
            self._endpoints[key] = ep
        return ep

    def _resolve(self, ip: str) -> Endpoint:
        w = self.state.workload_by_ip(ip) if self.state is not None else None
        if w is None:
            return Endpoint(ip, 0)
        pod = w.pod
        return Endpoint(ip, 0, pod=f"{pod.namespace}/{pod.name}", workload=workload_name(pod),
                        namespace=pod.namespace, identity=w.identity.spiffe_id, labels=pod.labels)

    def service_at(self, ip: str, port: int = 0) -> str:
        """"namespace/name" of the Service whose ClusterIP (and port, when given) this is, else ""."""
        with self._lock:
            self._fresh()
            if port:
                return self._services.get((ip, port), "")
            return self._services_any_port.get(ip, "")

    def is_local(self, ep: Endpoint) -> bool:
        """Whether the endpoint is a pod on this node (with no model, every endpoint is)."""
        if self.state is None or not self.node:
            return True
        w = self.state.workload_by_ip(ep.ip)
        return w is not None and w.pod.node == self.node
