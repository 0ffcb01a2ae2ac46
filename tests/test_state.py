"""The state model: parsing at the edge, derived workloads, identities, change notification."""

from __future__ import annotations

from pathlib import Path

import pytest

from accel.state import identity
from accel.state.identity import IdentityAllocator, natural_number, spiffe_id
from accel.state.model import (
    AuthorizationPolicy,
    AuthzSource,
    ChangeSet,
    Event,
    EventType,
    HTTPRoute,
    Kind,
    MtlsMode,
    NetworkPolicy,
    ObjectKey,
    Pod,
    Service,
)
from accel.state.parse import NotOurKind, ParseError, parse_object
from accel.state.store import ClusterState

pytestmark = pytest.mark.unit


def pod_obj(name: str, ns: str = "default", *, ip: str = "10.0.0.1", sa: str = "web", labels: dict | None = None,
            annotations: dict | None = None, node: str = "n1") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}, "annotations": annotations or {}},
            "spec": {"nodeName": node, "serviceAccountName": sa},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}, {"ip": "fd00::" + ip.rsplit(".", 1)[1]}]}}


def ns_obj(name: str, *, labels: dict | None = None, annotations: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}}}


def add(state: ClusterState, *objs: dict, synced: bool = False) -> ChangeSet:
    return state.apply([Event(EventType.ADDED, parse_object(o)) for o in objs], synced=synced)


def test_parse_pod_keeps_only_what_matters() -> None:
    p = parse_object(pod_obj("a", annotations={"meshaccel.io/mtls": "strict", "noise": "x" * 1000}))
    assert isinstance(p, Pod)
    assert p.ips == ("10.0.0.1", "fd00::1")
    assert dict(p.annotations) == {"meshaccel.io/mtls": "strict"}
    assert p.service_account == "web" and p.node == "n1" and p.key == ObjectKey(Kind.POD, "default", "a")
    with pytest.raises(TypeError):
        p.labels["x"] = "y"  # type: ignore[index]  # records are read-only all the way down


def test_parse_service_and_target_port_forms() -> None:
    s = parse_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "n",
                                                                           "annotations": {"meshaccel.io/l7": "true"}},
                      "spec": {"clusterIPs": ["10.96.0.1", "fd00::1"], "sessionAffinity": "ClientIP",
                               "internalTrafficPolicy": "Local",
                               "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                                         {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}})
    assert isinstance(s, Service)
    assert s.selector is None and s.l7 and s.session_affinity_timeout == 10800
    assert s.cluster_ips == ("10.96.0.1", "fd00::1")
    assert [p.target_port for p in s.ports] == ["http", 5353]


def test_parse_http_route() -> None:
    r = parse_object({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                      "metadata": {"name": "r", "namespace": "n"},
                      "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                               "hostnames": ["web.n"],
                               "rules": [{"matches": [{"path": {"type": "Exact", "value": "/a"},
                                                       "headers": [{"name": "x-v", "value": "2"}]}],
                                          "backendRefs": [{"name": "v1", "port": 80, "weight": 90},
                                                          {"name": "v2", "port": 80, "weight": 10}],
                                          "timeouts": {"request": "1m30s", "backendRequest": "500ms"},
                                          "retry": {"attempts": 3, "backoff": "100ms", "codes": [503]}}]}})
    assert isinstance(r, HTTPRoute)
    rule = r.rules[0]
    assert r.parent_refs[0].kind == "Service" and r.parent_refs[0].namespace == "n"
    assert [b.weight for b in rule.backend_refs] == [90, 10]
    assert rule.request_timeout_seconds == 90 and rule.backend_request_timeout_seconds == 0.5
    assert rule.retry is not None and rule.retry.attempts == 3 and rule.retry.codes == (503,)
    assert rule.matches[0].headers[0].name == "x-v"


@pytest.mark.parametrize("obj,msg", [
    ({"kind": "Pod"}, "apiVersion and kind"),
    ("just a string", "not a mapping"),
    ({"apiVersion": "v1", "kind": "Pod", "metadata": {}}, "metadata.name"),
    ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": "x"}]}},
     "Service default/s: spec.ports\\[0\\].port"),
    ({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "r"},
      "spec": {"rules": [{"timeouts": {"request": "soon"}}]}}, "not a duration"),
])
def test_parse_errors_name_the_problem(obj: object, msg: str) -> None:
    with pytest.raises(ParseError, match=msg):
        parse_object(obj)


def test_other_kinds_are_not_ours() -> None:
    with pytest.raises(NotOurKind):
        parse_object({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}})


def test_identity_numbers_are_deterministic_and_never_reserved(tmp_path: Path) -> None:
    sid = spiffe_id("shop", "cart")
    assert sid == "spiffe://cluster.local/ns/shop/sa/cart"
    a, b = IdentityAllocator(tmp_path), IdentityAllocator(None)
    assert a.number(sid) == b.number(sid) == natural_number(sid) >= identity.RESERVED
    assert a.number(spiffe_id("shop", "cart", "other.td")) != a.number(sid)


def test_identity_collisions_probe_and_survive_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "natural_number", lambda s, low=0, high=0: 1000)  # force every identity to collide
    first = IdentityAllocator(tmp_path)
    assert first.number("spiffe://x/ns/a/sa/a") == 1000
    assert first.number("spiffe://x/ns/b/sa/b") == 1001
    # After a restart the moved identity may be seen first: it must keep its number.
    again = IdentityAllocator(tmp_path)
    assert again.number("spiffe://x/ns/b/sa/b") == 1001
    assert again.number("spiffe://x/ns/a/sa/a") == 1000


def test_mtls_pod_wins_and_malformed_falls_back() -> None:
    problems: list[tuple[str, str]] = []
    st = ClusterState(default_mtls=MtlsMode.PERMISSIVE, on_problem=lambda r, m: problems.append((r, m)))
    add(st, ns_obj("shop", annotations={"meshaccel.io/mtls": "strict"}), ns_obj("plain"),
        pod_obj("a", "shop"), pod_obj("b", "shop", annotations={"meshaccel.io/mtls": "disable"}),
        pod_obj("c", "shop", annotations={"meshaccel.io/mtls": "yes please"}), pod_obj("d", "plain"))
    mode = {w.pod.name: w.mtls for w in st.workloads()}
    assert mode == {"a": MtlsMode.STRICT, "b": MtlsMode.DISABLE, "c": MtlsMode.STRICT, "d": MtlsMode.PERMISSIVE}
    assert [r for r, _ in problems] == ["mtls_annotation"]
    assert "Pod/shop/c" in problems[0][1] and "'yes please'" in problems[0][1]
    # A malformed namespace value falls back to the install default.
    add(st, ns_obj("plain", annotations={"meshaccel.io/mtls": "STRICTT"}))
    w = st.workload(ObjectKey(Kind.POD, "plain", "d"))
    assert w is not None and w.mtls is MtlsMode.PERMISSIVE
    assert [r for r, _ in problems] == ["mtls_annotation", "mtls_annotation"]


def test_istio_enrollment_and_exclusion() -> None:
    st = ClusterState()
    add(st, ns_obj("amb", labels={"istio.io/dataplane-mode": "ambient"}), ns_obj("x", labels={"meshaccel.io/exclude": "true"}),
        pod_obj("side", annotations={"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}),
        pod_obj("amb-pod", "amb"), pod_obj("opt-out", labels={"meshaccel.io/exclude": "true"}),
        pod_obj("in-x", "x"), pod_obj("plain"))
    w = {w.pod.name: w for w in st.workloads()}
    assert w["side"].istio_sidecar and w["side"].istio_managed and not w["side"].istio_ambient
    assert w["amb-pod"].istio_ambient and not w["plain"].istio_managed
    assert w["opt-out"].excluded and w["in-x"].excluded and not w["plain"].excluded
    assert w["plain"].identity.spiffe_id == "spiffe://cluster.local/ns/default/sa/web"


def test_changes_are_proportional_to_the_event() -> None:
    st = ClusterState()
    seen: list[ChangeSet] = []
    st.subscribe(seen.append)
    add(st, ns_obj("a"), ns_obj("b"), *[pod_obj(f"p{i}", "a" if i < 3 else "b", ip=f"10.0.0.{i + 1}")
                                        for i in range(10)], synced=True)
    assert seen[-1].synced and len(seen[-1].workloads) == 10
    # A namespace change re-derives only that namespace's pods.
    cs = add(st, ns_obj("a", annotations={"meshaccel.io/mtls": "strict"}))
    assert {wc.key.name for wc in cs.workloads} == {"p0", "p1", "p2"}
    # An unchanged object is no change at all, and notifies nobody.
    n = len(seen)
    cs = add(st, pod_obj("p5", "b", ip="10.0.0.6"))
    assert cs.changes == () and cs.workloads == () and len(seen) == n
    cs = st.apply([Event(EventType.DELETED, parse_object(pod_obj("p5", "b", ip="10.0.0.6")))])
    assert len(cs.workloads) == 1 and cs.workloads[0].new is None
    assert st.workload_by_ip("10.0.0.6") is None and st.workload_by_ip("10.0.0.5") is not None


def test_service_and_slice_bad_input_is_reported_and_kept() -> None:
    problems: list[str] = []
    st = ClusterState(on_problem=lambda r, m: problems.append(r))
    add(st, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "manual"}, "spec": {"ports": [{"port": 80}]}})
    add(st, {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "ghost-1", "labels": {"kubernetes.io/service-name": "ghost"}},
             "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.9"]}]})
    assert problems == ["service_without_selector", "endpointslice_unknown_service"]
    assert len(st.slices_of("default", "ghost")) == 1  # kept: the Service may arrive later
    assert st.slices_of("default", "ghost")[0].endpoints[0].ready  # unset condition means ready


# --- policy records, PeerAuthentication, security identities ---------------------------------------


def np_obj(name: str, spec: dict, ns: str = "default") -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ap_obj(name: str, spec: dict, ns: str = "default") -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def pa_obj(name: str, ns: str, mode: str, *, selector: dict | None = None, created: str = "") -> dict:
    spec: dict = {"mtls": {"mode": mode}}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": created}, "spec": spec}


def test_pod_keeps_its_named_container_ports() -> None:
    obj = pod_obj("a")
    obj["spec"]["containers"] = [{"name": "c", "ports": [{"name": "http", "containerPort": 8080},
                                                         {"containerPort": 9999},  # unnamed: not kept
                                                         {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                                         {"name": "bad", "containerPort": "x"}]}]  # skipped
    p = parse_object(obj)
    assert isinstance(p, Pod)
    assert p.port_named("http", "TCP") == 8080 and p.port_named("dns", "UDP") == 53
    assert p.port_named("dns", "TCP") is None and p.port_named("bad", "TCP") is None


def test_network_policy_defaults_and_problems_stay_on_the_record() -> None:
    np = parse_object(np_obj("a", {"podSelector": {"matchLabels": {"app": "db"}},
                                   "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {}}],
                                                "ports": [{"port": 5000, "endPort": 5010}, {"port": "http"}]}]}))
    assert isinstance(np, NetworkPolicy)
    assert np.policy_types == ("Ingress",) and not np.problems  # Egress only when there are egress rules
    assert np.ingress[0].ports[0].end_port == 5010 and np.ingress[0].ports[1].port == "http"
    np = parse_object(np_obj("b", {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}))
    assert isinstance(np, NetworkPolicy) and np.policy_types == ("Ingress", "Egress")
    # Unknown fields, an invalid CIDR, an except outside its cidr: problems on the rule, named.
    np = parse_object(np_obj("c", {"podSelector": {}, "ingres": [],
                                   "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]},
                                              {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/8"]}}]},
                                              {"too": []}]}))
    assert isinstance(np, NetworkPolicy)
    assert np.problems == ("NetworkPolicy default/c: spec: unknown field 'ingres'",)
    assert "is not a CIDR" in np.egress[0].problems[0] and "strict subset" in np.egress[1].problems[0]
    assert "unknown field 'too'" in np.egress[2].problems[0]


def test_authorization_policy_problems_keep_deny_rules_wide() -> None:
    ap = parse_object(ap_obj("d", {"action": "DENY", "rules": [
        {"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"], "ipBlocks": ["10.0.0.999"]}}, "oops"],
         "to": [{"operation": {"ports": ["80"], "methods": ["GET"]}}]}]}))
    assert isinstance(ap, AuthorizationPolicy)
    rule = ap.rules[0]
    assert len(rule.problems) == 2 and "ipBlocks" in rule.problems[0]
    # The unreadable field is left out (the source matches more), the unreadable entry is a wildcard.
    assert rule.sources[0].principals == ("cluster.local/ns/a/sa/b",) and rule.sources[0].ip_blocks == ()
    assert rule.sources[1] == AuthzSource()
    assert rule.operations[0].has_l7 and rule.operations[0].ports == ("80",)
    ap = parse_object(ap_obj("e", {"action": "MAYBE", "selector": {"matchExpressions": []}}))
    assert isinstance(ap, AuthorizationPolicy) and ap.action == "ALLOW" and ap.selector is None
    assert len(ap.problems) == 2


def test_peer_authentication_sits_below_the_annotation() -> None:
    objects: list[tuple[str, ObjectKey]] = []
    st = ClusterState(default_mtls=MtlsMode.DISABLE,
                      on_object_problem=lambda r, k, m: objects.append((r, k)))
    add(st, ns_obj("istio-system"), ns_obj("shop"), ns_obj("ann", annotations={"meshaccel.io/mtls": "disable"}),
        pod_obj("a", "shop", labels={"app": "a"}), pod_obj("b", "shop", labels={"app": "b"}),
        pod_obj("c", "ann", ip="10.0.0.3"),
        pod_obj("d", "shop", labels={"app": "b"}, annotations={"meshaccel.io/mtls": "permissive"}))

    def modes() -> dict[str, tuple[MtlsMode, str]]:
        return {w.pod.name: (w.mtls, w.mtls_source) for w in st.workloads()}

    cs = add(st, pa_obj("mesh", "istio-system", "STRICT"))
    assert {wc.key.name for wc in cs.workloads} == {"a", "b"}  # only pods whose mode changed
    m = modes()
    assert m["a"] == (MtlsMode.STRICT, "PeerAuthentication/istio-system/mesh")
    assert m["c"] == (MtlsMode.DISABLE, "namespace") and m["d"] == (MtlsMode.PERMISSIVE, "pod")
    add(st, pa_obj("ns", "shop", "PERMISSIVE"), pa_obj("wl", "shop", "DISABLE", selector={"app": "b"}))
    m = modes()
    assert m["a"][0] is MtlsMode.PERMISSIVE and m["b"] == (MtlsMode.DISABLE, "PeerAuthentication/shop/wl")
    add(st, pa_obj("wl", "shop", "UNSET", selector={"app": "b"}))  # UNSET defers to the namespace level
    assert modes()["b"][0] is MtlsMode.PERMISSIVE
    # Two namespace-wide policies: the oldest applies, the other is reported on its object.
    add(st, pa_obj("ns2", "shop", "STRICT", created="2020-01-01T00:00:00Z"))
    assert modes()["a"][0] is MtlsMode.STRICT
    assert ("peer_authentication_conflict", ObjectKey(Kind.PEER_AUTHENTICATION, "shop", "ns")) in objects
    st.apply([Event(EventType.DELETED, parse_object(pa_obj("ns2", "shop", "STRICT")))])
    assert modes()["a"][0] is MtlsMode.PERMISSIVE
    # The annotation problem of a pod goes to the object reporter too.
    add(st, pod_obj("e", "shop", ip="10.0.0.9", annotations={"meshaccel.io/mtls": "sure"}))
    assert ("mtls_annotation", ObjectKey(Kind.POD, "shop", "e")) in objects


def test_security_identity_is_shared_by_equal_pods_with_a_reverse_table() -> None:
    st = ClusterState()
    add(st, ns_obj("shop"), pod_obj("a1", "shop", labels={"app": "a"}), pod_obj("a2", "shop", ip="10.0.0.2",
                                                                               labels={"app": "a"}),
        pod_obj("b", "shop", ip="10.0.0.3", labels={"app": "b"}), pod_obj("x", "shop", ip="10.0.0.4", sa="other",
                                                                           labels={"app": "a"}))
    w = {w.pod.name: w for w in st.workloads()}
    n = w["a1"].security_identity
    assert n == w["a2"].security_identity >= identity.SECURITY_MIN
    assert len({n, w["b"].security_identity, w["x"].security_identity}) == 3
    si = st.security_identity(n)
    assert si is not None and (si.namespace, si.service_account, dict(si.labels)) == ("shop", "web", {"app": "a"})
    # The number is a function of (namespace, service account, labels): another agent derives the same.
    assert ClusterState().security_ids.number(identity.security_key("shop", "web", {"app": "a"})) == n
    # Gone with its last pod, back with the same number.
    for name in ("a1", "a2"):
        st.apply([Event(EventType.DELETED, parse_object(pod_obj(name, "shop", labels={"app": "a"})))])
    assert st.security_identity(n) is None and n not in st.security_identities()
    add(st, pod_obj("a3", "shop", ip="10.0.0.7", labels={"app": "a"}))
    assert st.security_identity(n) is not None
