"""translate(): a pure function from model records to Envoy resources."""

from __future__ import annotations

import pytest

from accel.translate import L7Options, cluster_name, listener_name, translate
from meshxds.cache import snapshot_of
from tests.envoy_helpers import Backend
from tests.test_xds_envoy import front_route, service, slice_for

pytestmark = [pytest.mark.unit]


class _FakeBackend(Backend):
    def __init__(self, name: str, port: int) -> None:  # no socket: only name and port are read
        self.name, self._port = name, port

    @property
    def port(self) -> int:
        return self._port


def test_non_l7_services_produce_nothing() -> None:
    res = translate([service("plain")], [slice_for("plain", _FakeBackend("a", 9000))], [])
    assert (res.clusters, res.endpoints, res.listeners, res.routes) == ((), (), (), ())


def test_annotation_makes_a_service_l7_with_its_ready_endpoints() -> None:
    svc = service("web", {"meshaccel.io/l7": "true"})
    slices = [slice_for("web", _FakeBackend("a", 9001)), slice_for("web", _FakeBackend("b", 9002), ready=False)]
    res = translate([svc], slices, [], L7Options(listener_address=lambda s, p: ("127.0.0.1", 15080)))
    assert [lis.name for lis in res.listeners] == [listener_name("shop", "web", 80)]
    assert res.listeners[0].address.socket_address.port_value == 15080
    (cla,) = res.endpoints
    assert cla.cluster_name == cluster_name("shop", "web", 80)
    ports = [e.endpoint.address.socket_address.port_value for e in cla.endpoints[0].lb_endpoints]
    assert ports == [9001]  # the not-ready endpoint is left out
    assert [r.name for r in res.routes[0].virtual_hosts[0].routes] == ["default"]  # what its flows name


def test_httproute_rules_become_ordered_routes() -> None:
    route = front_route("""
  - backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: v1, port: 80, weight: 90}, {name: v2, port: 80, weight: 10}]
    timeouts: {request: 3s}
    retry: {attempts: 2, codes: [503]}
  - matches: [{path: {type: Exact, value: /health}}]
    backendRefs: [{name: v2, port: 80}]
""")
    res = translate([service("front"), service("v1"), service("v2")], [], [route])
    (rc,) = res.routes
    routes = rc.virtual_hosts[0].routes
    assert routes[0].match.path == "/health"  # exact before prefix
    assert routes[1].match.path_separated_prefix == "/api"
    assert routes[1].match.headers[0].name == "x-canary"
    wc = routes[1].route.weighted_clusters.clusters
    assert [(c.name, c.weight.value) for c in wc] == [(cluster_name("shop", "v1", 80), 90),
                                                      (cluster_name("shop", "v2", 80), 10)]
    assert routes[1].route.timeout.seconds == 3
    assert routes[1].route.retry_policy.num_retries.value == 2
    assert list(routes[1].route.retry_policy.retriable_status_codes) == [503]
    assert routes[2].match.prefix == "/"
    # Each route is named after its rule: what an L7 request's flow says as its route.
    assert [r.name for r in routes] == [f"HTTPRoute/shop/{route.name}[{i}]" for i in (2, 1, 0)]
    assert {c.name for c in res.clusters} == {cluster_name("shop", "v1", 80), cluster_name("shop", "v2", 80)}
    # Same model, same snapshot version; a change, a new one.
    assert snapshot_of(res).version == snapshot_of(translate([service("front"), service("v1"), service("v2")],
                                                       [], [route])).version
    with_endpoint = translate([service("front"), service("v1"), service("v2")],
                              [slice_for("v1", _FakeBackend("a", 9000))], [route])
    assert snapshot_of(res).version != snapshot_of(with_endpoint).version


def test_missing_backend_is_reported_not_fatal() -> None:
    res = translate([service("front")], [], [front_route("  - backendRefs: [{name: ghost, port: 80}]")])
    assert res.problems and "ghost" in res.problems[0]
    assert res.endpoints[0].endpoints == []
