"""The state model: parsing at the edge, derived workloads, identities, change notification."""

from __future__ import annotations

from pathlib import Path

import pytest

from accel.state import identity
from accel.state.identity import IdentityAllocator, natural_number, spiffe_id
from accel.state.model import (
    ChangeSet,
    Event,
    EventType,
    HTTPRoute,
    Kind,
    MtlsMode,
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
