"""From this node's enrolled pods to the node Envoy's HBONE resources: a pure function.

Per enrolled pod on this node (its SVID issued, its network namespace found):
  listener `capture|<ns>/<pod>`  127.0.0.1:15001 and [::1]:15001 inside the pod: outbound capture
  listener `hbone|<ns>/<pod>`    <pod ip>:15008 inside the pod: HBONE inbound, the pod's own SVID,
                                 and its routes (same name, by RDS) with the pod's policy (RBAC)
Per local source identity: cluster `hbone_out|<spiffe id>` (HBONE origination with that identity);
and one cluster `hbone_deliver` that connects terminated tunnels to their pod.
So the config grows with the pods of this node, never with the pods of the cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2

from accel.policy.rbac import InboundRbac
from accel.policy.types import Verdict
from accel.state.model import ObjectKey, Workload
from meshxds import hbone
from meshxds.cache import Resources
from meshxds.sds import trust_name

DELIVERY_CLUSTER = "hbone_deliver"


@dataclass(frozen=True, slots=True)
class MeshPod:
    key: ObjectKey
    ips: tuple[str, ...]
    spiffe_id: str  # also the name of its certificate secret (SDS)
    netns: str  # path Envoy opens to create the pod's listeners inside its namespace
    baggage: str
    rbac: tuple[hbone.PortRule, ...] | None = None  # who may open tunnels to which port; None: no policy


def origination_cluster_name(spiffe_id: str) -> str:
    return f"hbone_out|{spiffe_id}"


def capture_listener_name(key: ObjectKey) -> str:
    return f"capture|{key.namespace}/{key.name}"


def inbound_listener_name(key: ObjectKey) -> str:
    return f"hbone|{key.namespace}/{key.name}"


def baggage_of(w: Workload) -> str:
    """ztunnel's baggage for a source workload: Istio's canonical service and revision labels, falling back
    to the usual app/version labels, as Istio derives them."""
    labels = w.pod.labels
    service = (labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
               or labels.get("app") or w.pod.name)
    version = (labels.get("service.istio.io/canonical-revision") or labels.get("app.kubernetes.io/version")
               or labels.get("version") or "latest")
    return hbone.baggage(w.pod.namespace, w.pod.name, "pod", service, version)


def port_rules(rbac: InboundRbac) -> tuple[hbone.PortRule, ...] | None:
    """The compiler's verdicts for one pod's tunnels as Envoy RBAC port rules (None: no policy applies)."""
    if not rbac.ranges:
        return None
    out = []
    for r in rbac.ranges:
        allow = r.default[0] is Verdict.ALLOW
        odd = tuple(sorted(p for p, (v, _rule) in r.principals.items() if (v is Verdict.ALLOW) != allow))
        out.append(hbone.PortRule(r.lo, r.hi, allow, odd))
    return tuple(out)


def mesh_resources(pods: Iterable[MeshPod], trust_domain: str,
                   outbound_log: Callable[[MeshPod], Sequence[accesslog_pb2.AccessLog]] = lambda _p: (),
                   inbound_log: Sequence[accesslog_pb2.AccessLog] = ()) -> tuple[Resources, list[str]]:
    """The HBONE listeners and clusters for `pods`, and the secret names they need (SPIFFE IDs).
    `outbound_log(pod)`/`inbound_log`: access logs of the capture (TCP) and HBONE (HTTP) listeners."""
    listeners, routes, clusters, identities = [], [], {}, set()
    for p in sorted(pods, key=lambda p: p.key):
        cluster = origination_cluster_name(p.spiffe_id)
        if cluster not in clusters:
            clusters[cluster] = hbone.origination_cluster(cluster, p.spiffe_id, trust_name(p.spiffe_id), trust_domain)
        identities.add(p.spiffe_id)
        source_ip = next((ip for ip in p.ips if ":" not in ip), p.ips[0])
        listeners.append(hbone.capture_listener(capture_listener_name(p.key), p.netns, cluster, source_ip,
                                                p.baggage, outbound_log(p)))
        rbac = hbone.connect_rbac(p.rbac) if p.rbac is not None else None
        inbound = inbound_listener_name(p.key)
        listeners.append(hbone.inbound_listener(inbound, p.ips, p.netns, p.spiffe_id, trust_name(p.spiffe_id),
                                                trust_domain, access_log=inbound_log))
        routes.append(hbone.inbound_routes(inbound, p.ips, DELIVERY_CLUSTER, rbac))
    out = list(clusters.values())
    if listeners:
        out.append(hbone.delivery_cluster(DELIVERY_CLUSTER))
    return Resources(clusters=tuple(out), listeners=tuple(listeners), routes=tuple(routes)), sorted(identities)
