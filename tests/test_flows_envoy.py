"""Envoy's access log to flows, end to end: a real Envoy (driven by our ADS server) with the access
log config of meshxds/access_log.py streams to our ALS server (meshxds/als.py); the entries become flows
(accel/flows_envoy.py) resolved against a model whose pods live on 127.0.0.x loopback addresses.
Every byte count is checked against what the test sent and received."""

from __future__ import annotations

import http.client
import http.server
import itertools
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import wrappers_pb2

from accel.agent_flows import AgentFlows
from accel.envoy import Envoy, EnvoyConfig
from accel.flows import Flow, FlowStore
from accel.flows_envoy import EnvoyFlows, forwarded_for
from accel.flows_metrics import IstioMetrics
from accel.flows_resolve import EndpointResolver
from accel.state.model import Event, EventType
from accel.state.parse import parse_object
from accel.state.store import ClusterState
from meshxds import access_log as AL
from meshxds import resources as R
from meshxds.als import SERVICE, AccessLogServer
from meshxds.cache import Resources, SnapshotCache, snapshot_of
from meshxds.sds import SecretMaterial, build_secrets, trust_name
from meshxds.server import XdsServer
from tests.envoy_helpers import free_port, issue, make_ca
from tests.waiting import wait_until

pytestmark = [pytest.mark.envoy]

NODE = "node-a"
WEB_IP, CLIENT_IP, DB_IP = "127.0.0.11", "127.0.0.12", "127.0.0.13"
CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/client"
DB_ID = "spiffe://cluster.local/ns/shop/sa/db"
_versions = itertools.count(1)


def model() -> ClusterState:
    docs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}]
    for name, ip, sa, labels in [
        ("web-6f9c7-x2k4q", WEB_IP, "web", {"app": "web", "version": "v2", "pod-template-hash": "6f9c7"}),
        ("client-0", CLIENT_IP, "client", {"app": "client", "controller-revision-hash": "client-5d"}),
        ("db-7c4b9-qq8rt", DB_IP, "db", {"app": "db", "pod-template-hash": "7c4b9"}),
    ]:
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": name, "namespace": "shop", "uid": f"uid-{name}", "labels": labels},
                     "spec": {"nodeName": NODE, "serviceAccountName": sa},
                     "status": {"phase": "Running", "podIPs": [{"ip": ip}],
                                "conditions": [{"type": "Ready", "status": "True"}]}})
    docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "shop"},
                 "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 5432, "protocol": "TCP"}]}})
    st = ClusterState()
    st.apply([Event(EventType.ADDED, parse_object(d)) for d in docs], synced=True)
    return st


# --- backends ------------------------------------------------------------------------------------

class _Web(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b"hello from web, " * 40

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Sink(socketserver.BaseRequestHandler):
    """Reads until the client shuts its side, then answers with as many bytes times 3 and closes."""

    def handle(self) -> None:
        got = 0
        while chunk := self.request.recv(65536):
            got += len(chunk)
        self.request.sendall(b"r" * (3 * got))


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[int, int]]:
    web = http.server.ThreadingHTTPServer((WEB_IP, 0), _Web)
    web.daemon_threads = True
    db = _TcpServer((DB_IP, 0), _Sink)
    for s in (web, db):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield web.server_address[1], db.server_address[1]
    finally:
        for s in (web, db):
            s.shutdown()
            s.server_close()


# --- the Envoy side ------------------------------------------------------------------------------

@dataclass
class Ports:
    l7: int
    tcp: int
    dead: int
    tunnel_in: int
    tunnel_out: int


def tcp_listener(name: str, port: int, cluster: str, downstream_tls: str = "") -> listener_pb2.Listener:
    tp = tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster=cluster)
    chain = listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
        name="envoy.filters.network.tcp_proxy", typed_config=R.pack(tp))])
    if downstream_tls:  # the inbound end of a tunnel: mTLS, client certificate required
        common = tls_pb2.CommonTlsContext(
            tls_certificate_sds_secret_configs=[R.sds_secret_config(downstream_tls)],
            validation_context_sds_secret_config=R.sds_secret_config(trust_name(downstream_tls)))
        chain.transport_socket.name = "envoy.transport_sockets.tls"
        chain.transport_socket.typed_config.CopyFrom(R.pack(tls_pb2.DownstreamTlsContext(
            common_tls_context=common, require_client_certificate=wrappers_pb2.BoolValue(value=True))))
    return listener_pb2.Listener(name=name, address=R.socket_address("127.0.0.1", port), filter_chains=[chain])


def resources(ports: Ports, web_port: int, db_port: int, als_address: str) -> Resources:
    fast = {"flush_interval_s": 0.05}
    l7 = AL.attach(R.http_listener("l7|shop|web|80", "127.0.0.1", ports.l7, "l7|shop|web|80"),
                   http=AL.http_access_log("l7", "outbound", "shop/web", **fast))
    routes = R.route_config("l7|shop|web|80", [
        route_components_pb2.Route(name="web-empty", match=R.route_match("PathPrefix", "/nobackend"),
                                   route=R.route_action([("svc|shop|empty|80", 1)])),
        route_components_pb2.Route(name="web-default", match=R.route_match(),
                                   route=R.route_action([("svc|shop|web|80", 1)])),
    ])
    tcp = AL.attach(tcp_listener("tcp", ports.tcp, "db"), tcp=AL.tcp_access_log("tcp", service="shop/db", **fast))
    dead = AL.attach(tcp_listener("dead", ports.dead, "dead"), tcp=AL.tcp_access_log("tcp", **fast))
    t_in = AL.attach(tcp_listener("tunnel_in", ports.tunnel_in, "db", downstream_tls=DB_ID),
                     tcp=AL.tcp_access_log("tunnel", "inbound", **fast))
    t_out = AL.attach(tcp_listener("tunnel_out", ports.tunnel_out, "tunnel"),
                      tcp=AL.tcp_access_log("tunnel", "outbound", upstream_peer=True, **fast))
    tunnel = R.eds_cluster("tunnel")
    tunnel.transport_socket.name = "envoy.transport_sockets.tls"
    tunnel.transport_socket.typed_config.CopyFrom(R.pack(tls_pb2.UpstreamTlsContext(common_tls_context=tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[R.sds_secret_config(CLIENT_ID)],
        validation_context_sds_secret_config=R.sds_secret_config(trust_name(CLIENT_ID))))))
    clusters: list[cluster_pb2.Cluster] = [AL.als_cluster(als_address), R.eds_cluster("svc|shop|web|80"),
                                           R.eds_cluster("svc|shop|empty|80"), R.eds_cluster("db"),
                                           R.eds_cluster("dead"), tunnel]
    endpoints = [R.load_assignment("svc|shop|web|80", [R.Backend(WEB_IP, web_port)]),
                 R.load_assignment("svc|shop|empty|80", []),
                 R.load_assignment("db", [R.Backend(DB_IP, db_port)]),
                 R.load_assignment("dead", [R.Backend(DB_IP, free_port())]),
                 R.load_assignment("tunnel", [R.Backend("127.0.0.1", ports.tunnel_in)])]
    return Resources(tuple(clusters), tuple(endpoints), (l7, tcp, dead, t_in, t_out), (routes,))


@dataclass
class Setup:
    flows: AgentFlows
    store: FlowStore
    decoder: EnvoyFlows
    metrics: IstioMetrics
    als: AccessLogServer
    ports: Ports


@pytest.fixture(scope="module")
def setup(servers: tuple[int, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    sock = Path(tmp_path_factory.mktemp("als")) / "als.sock"
    flows = AgentFlows(NODE, model(), capacity=1000, als_listen=f"unix:{sock}")  # what the agent runs
    flows.start()
    assert flows.als is not None
    ca = make_ca()
    material = {}
    for serial, sid in enumerate((CLIENT_ID, DB_ID), start=1):
        cert, key = issue(ca, sid, serial)
        material[sid] = SecretMaterial(cert, key, ca.pem)
    ports = Ports(*(free_port() for _ in range(5)))
    cache = SnapshotCache()
    xds = XdsServer(cache)
    xds.start("127.0.0.1:0")
    envoy = Envoy(EnvoyConfig(node_id=NODE, xds_address=xds.address))
    try:
        snap = snapshot_of(resources(ports, *servers, f"unix:{sock}"), build_secrets(material, material.get),
                           version=f"v{next(_versions)}")
        cache.set_snapshot(NODE, snap)
        envoy.start(wait_live=True)
        wait_until(lambda: xds.settled(NODE, snap.version), what="envoy settled")
        wait_until(lambda: _connects(ports.tunnel_in), what="tunnel listener up")
        yield Setup(flows, flows.store, flows.envoy, flows.istio, flows.als, ports)
    finally:
        envoy.stop()
        xds.stop()
        flows.stop()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def send_tcp(port: int, nbytes: int) -> bytes:
    """From the client pod's address: send `nbytes`, shut the write side, read the answer to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT_IP, 0)) as s:
        s.sendall(b"q" * nbytes)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def wait_flows(store: FlowStore, pred: Callable[[Flow], bool] = lambda f: True, **want: object) -> list[Flow]:
    """The stored flows with these field values (and `pred`), once there is at least one."""
    def found() -> list[Flow]:
        return [f for f in store.recent() if pred(f) and all(getattr(f, k) == v for k, v in want.items())]
    wait_until(lambda: bool(found()), what=f"a flow with {want}")
    return found()


# --- the tests -----------------------------------------------------------------------------------

def test_http_request_becomes_an_l7_flow_with_status_route_and_bytes(setup: Setup, servers: tuple[int, int]) -> None:
    c = http.client.HTTPConnection("127.0.0.1", setup.ports.l7, timeout=10, source_address=(CLIENT_IP, 0))
    c.request("GET", "/hello?x=1")
    r = c.getresponse()
    body = r.read()
    c.close()
    assert r.status == 200 and body == _Web.body
    [f] = wait_flows(setup.store, path="l7", http_path="/hello?x=1")
    assert (f.event, f.source, f.verdict, f.http_method, f.http_status, f.route) == \
        ("close", "envoy", "forwarded", "GET", 200, "web-default")
    assert f.service == "shop/web" and f.response_flags == "-" and not f.encrypted
    assert abs(f.time - time.time()) < 60 and 0 < f.duration_seconds < 10  # the request's end, from Envoy's clock
    assert (f.src.ip, f.src.pod, f.src.workload, f.src.identity) == (CLIENT_IP, "shop/client-0", "client", CLIENT_ID)
    assert (f.dst.ip, f.dst.port, f.dst.pod, f.dst.workload) == (WEB_IP, servers[0], "shop/web-6f9c7-x2k4q", "web")
    # Response bytes = the headers Envoy sent back + exactly the body; request = headers only.
    assert f.bytes_received > len(_Web.body) and f.bytes_received - len(_Web.body) < 400
    assert 0 < f.bytes_sent < 400
    got = setup.metrics.requests.labels(*setup.metrics.labels_of(f, "source"), "200")._value.get()
    assert got == 1.0


def test_http_to_a_service_with_no_backend_is_refused_with_envoys_flag(setup: Setup) -> None:
    c = http.client.HTTPConnection("127.0.0.1", setup.ports.l7, timeout=10, source_address=(CLIENT_IP, 0))
    c.request("GET", "/nobackend")
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status == 503
    [f] = wait_flows(setup.store, http_path="/nobackend")
    assert (f.event, f.verdict, f.reason, f.response_flags, f.http_status, f.route) == \
        ("close", "refused", "no_backend", "UH", 503, "web-empty")


def test_tcp_connection_opens_and_closes_with_exact_bytes(setup: Setup, servers: tuple[int, int]) -> None:
    answer = send_tcp(setup.ports.tcp, 12345)
    assert answer == b"r" * 3 * 12345
    [opened] = wait_flows(setup.store, path="tcp", event="open", service="shop/db")
    [closed] = wait_flows(setup.store, path="tcp", event="close", service="shop/db")
    assert closed.src.port == opened.src.port and closed.src.pod == "shop/client-0"
    assert (closed.dst.ip, closed.dst.port, closed.dst.workload) == (DB_IP, servers[1], "db")
    assert (closed.bytes_sent, closed.bytes_received) == (12345, 3 * 12345)
    assert closed.verdict == "forwarded" and not closed.encrypted and closed.duration_seconds > 0
    labels = setup.metrics.labels_of(closed, "source")
    assert setup.metrics.received.labels(*labels)._value.get() == 12345  # Istio: request bytes
    assert setup.metrics.sent.labels(*labels)._value.get() == 3 * 12345


def test_tcp_to_a_dead_upstream_is_refused(setup: Setup) -> None:
    with pytest.raises(OSError):  # Envoy resets the client (at shutdown or read): the upstream refused it
        send_tcp(setup.ports.dead, 10)
    [f] = wait_flows(setup.store, lambda f: "UF" in f.response_flags.split(","), event="refused")
    assert (f.verdict, f.reason, f.path, f.src.pod) == ("refused", "upstream_failed", "tcp", "shop/client-0")


def test_tunnel_flows_carry_both_identities_from_the_certificates(setup: Setup) -> None:
    assert send_tcp(setup.ports.tunnel_out, 7000) == b"r" * 21000
    wait_until(lambda: len(wait_flows(setup.store, path="tunnel", bytes_sent=7000)) >= 2, what="both tunnel ends")
    tunnel = wait_flows(setup.store, path="tunnel", event="close", bytes_sent=7000)
    inbound = [f for f in tunnel if f.dst.ip == DB_IP]
    outbound = [f for f in tunnel if f.src.ip == CLIENT_IP]
    assert len(inbound) == 1 and len(outbound) == 1, tunnel
    inbound, outbound = inbound[0], outbound[0]
    # Inbound (Envoy terminated mTLS): the source is who the client certificate says.
    assert inbound.encrypted and inbound.src.identity == CLIENT_ID and inbound.dst.identity == DB_ID
    assert (inbound.bytes_sent, inbound.bytes_received) == (7000, 21000)
    # Outbound (Envoy originated mTLS): the destination is who the server certificate says.
    assert outbound.encrypted and outbound.dst.identity == DB_ID and outbound.src.identity == CLIENT_ID
    assert (outbound.dst.ip, outbound.dst.port) == ("127.0.0.1", setup.ports.tunnel_in)
    assert (outbound.bytes_sent, outbound.bytes_received) == (7000, 21000)
    mtls = setup.metrics.labels_of(inbound, "destination")
    assert mtls[-1] == "mutual_tls" and mtls[LABEL_SRC_PRINCIPAL] == CLIENT_ID


LABEL_SRC_PRINCIPAL = 5  # position of source_principal in the Istio label set


# --- malformed input, over a real gRPC stream --------------------------------------------------------

def test_malformed_messages_and_entries_are_counted_and_skipped(setup: Setup) -> None:
    before = setup.decoder.status()
    als_before = setup.als.status()
    good = al.TCPAccessLogEntry()
    good.common_properties.downstream_remote_address.socket_address.address = CLIENT_IP
    good.common_properties.downstream_remote_address.socket_address.port_value = 40000
    good.common_properties.upstream_remote_address.socket_address.address = DB_IP
    good.common_properties.upstream_remote_address.socket_address.port_value = 5432
    good.common_properties.access_log_type = al.TcpConnectionEnd
    good.common_properties.custom_tags["meshaccel.path"] = "tcp"
    good.connection_properties.received_bytes = 4242
    no_address = al.TCPAccessLogEntry()
    bad_ip = al.TCPAccessLogEntry()
    bad_ip.CopyFrom(good)
    bad_ip.common_properties.downstream_remote_address.socket_address.address = "not-an-ip"
    bad_http = al.HTTPAccessLogEntry(common_properties=good.common_properties)
    bad_http.response.response_code.value = 70000
    tcp = als_pb2.StreamAccessLogsMessage()  # a message carries HTTP or TCP entries (a oneof)
    tcp.identifier.node.id = "fuzzer"
    tcp.tcp_logs.log_entry.extend([no_address, good, bad_ip])
    http = als_pb2.StreamAccessLogsMessage()
    http.http_logs.log_entry.append(bad_http)
    requests = [b"\xff\xff\xff garbage that is no protobuf", tcp.SerializeToString(), http.SerializeToString()]
    with grpc.insecure_channel(setup.als.address) as ch:
        call = ch.stream_unary(f"/{SERVICE}/StreamAccessLogs", request_serializer=None,
                               response_deserializer=als_pb2.StreamAccessLogsResponse.FromString)
        call(iter(requests), timeout=10)  # the stream is answered normally: nothing aborted it
    [f] = wait_flows(setup.store, bytes_sent=4242)
    assert f.src.pod == "shop/client-0" and f.dst.workload == "db"
    after, als_after = setup.decoder.status(), setup.als.status()
    assert after["malformed_entries"] - before["malformed_entries"] == 3
    assert als_after.malformed_messages - als_before.malformed_messages == 1
    text = setup.flows.metrics_text().decode()
    assert f'meshaccel_access_log_entries_total{{result="malformed"}} {after["malformed_entries"]:.1f}' in text
    assert f"meshaccel_access_log_malformed_messages_total {als_after.malformed_messages:.1f}" in text
    assert setup.als.alive()


# --- the source pod of an HBONE stream, from the CONNECT's `forwarded` --------------------------------

@pytest.mark.parametrize(("header", "want"), [
    ('for="127.0.0.12:40000"', ("127.0.0.12", 40000)),
    ('for="[fd00::5]:40000";proto=https', ("fd00::5", 40000)),
    ("proto=http; for=127.0.0.12, for=10.0.0.1", ("127.0.0.12", 0)),
    ('for="_hidden"', None),
    ("by=127.0.0.1", None),
])
def test_forwarded_for(header: str, want: tuple[str, int] | None) -> None:
    assert forwarded_for(header) == want


def test_an_hbone_streams_source_is_the_pod_forwarded_names_only_with_the_certificates_identity() -> None:
    decoder = EnvoyFlows(FlowStore(10), EndpointResolver(model(), NODE))

    def connect(forwarded: str) -> Flow:
        e = al.HTTPAccessLogEntry()
        c = e.common_properties
        c.downstream_remote_address.socket_address.address = "10.9.9.9"  # the peer node's Envoy
        c.downstream_remote_address.socket_address.port_value = 51000
        c.upstream_remote_address.socket_address.address = DB_IP
        c.upstream_remote_address.socket_address.port_value = 5432
        c.tls_properties.tls_version = al.TLSProperties.TLSv1_3
        c.tls_properties.peer_certificate_properties.subject_alt_name.add(uri=CLIENT_ID)
        c.custom_tags[AL.TAG_PATH] = "tunnel"
        c.access_log_type = al.DownstreamTunnelSuccessfullyEstablished
        e.request.request_method = base_pb2.CONNECT
        if forwarded:
            e.request.request_headers["forwarded"] = forwarded
        e.response.response_code.value = 200
        f = decoder.http_flow(e)
        assert f is not None
        return f

    named = connect(f'for="{CLIENT_IP}:40000"')
    assert (named.src.pod, named.src.ip, named.src.port, named.src.identity) == ("shop/client-0", CLIENT_IP, 40000,
                                                                                 CLIENT_ID)
    assert named.event == "open" and named.dst.pod == "shop/db-7c4b9-qq8rt"
    # A header naming a pod of another identity, or nothing usable: the node stays the source.
    for header in (f'for="{DB_IP}:40000"', 'for="unknown"', ""):
        f = connect(header)
        assert (f.src.ip, f.src.pod, f.src.identity) == ("10.9.9.9", "", CLIENT_ID), header
    # An L7 request's own Forwarded header (the application's) names nothing.
    e = al.HTTPAccessLogEntry()
    e.common_properties.downstream_remote_address.socket_address.address = CLIENT_IP
    e.common_properties.upstream_remote_address.socket_address.address = DB_IP
    e.request.request_method = base_pb2.GET
    e.request.request_headers["forwarded"] = f'for="{CLIENT_IP}:1"'
    e.response.response_code.value = 200
    f = decoder.http_flow(e)
    assert f is not None and (f.src.ip, f.src.port) == (CLIENT_IP, 0)
