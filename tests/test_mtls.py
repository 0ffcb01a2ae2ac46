"""Transparent mTLS between nodes (HBONE through the node Envoy), in a two-node lab with the real agents,
real eBPF programs and real Envoys.

Pods, spread over the nodes in turn (odd on node1, even on node2), by `meshaccel.io/mtls` on the pod:
  pod1, pod2 strict      pod3, pod4 permissive      pod5, pod6 not enrolled (disable)
  pod7 spare (disable)   pod8 an Istio-ambient pod where the interop test runs a waypoint-like Envoy
The agents get their SVIDs from `accel ca serve` over the CSR API (so the CA can be taken down).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from accel.lab import Lab
from accel.lab_agent import NAMESPACE, LabCluster
from accel.lab_certs import Credential, credential
from accel.splice_guard import tcp_memory_pages
from accel.state.model import MTLS_ANNOTATION, MtlsMode
from certs.ca import CertificateAuthority
from sockops_bpf import loader
from sockops_bpf.maps import open_mesh, open_pinned
from tests import waiting
from tests.conftest import leftovers, require_lab_with_envoy
from tests.mesh_helpers import ECHO_SERVER, ask, hbone
from tests.paused_reader import PausedTransfer

pytestmark = [pytest.mark.lab, pytest.mark.envoy, pytest.mark.slow]

MODES = {"pod1": "strict", "pod2": "strict", "pod3": "permissive", "pod4": "permissive",
         "pod5": "disable", "pod6": "disable", "pod7": "disable"}
LABELS = {"pod8": {"istio.io/dataplane-mode": "ambient"}}
PORT = 8080
TD = "cluster.local"


def sid(pod: str) -> str:
    return f"spiffe://{TD}/ns/{NAMESPACE}/sa/{pod}"


def mtls_annotations(modes: dict[str, str]) -> dict[str, dict[str, str]]:
    return {p: {MTLS_ANNOTATION: m} for p, m in modes.items()}


class Mesh:
    def __init__(self, lab: Lab, cluster: LabCluster) -> None:
        self.lab = lab
        self.cluster = cluster
        self.servers: list[subprocess.Popen[str]] = []

    def serve(self, pod: str, port: int = PORT) -> None:
        s = self.lab.popen(pod, [sys.executable, "-c", ECHO_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
        assert s.stdout is not None and s.stdout.readline().strip() == "listening"
        self.servers.append(s)

    def ip(self, pod: str) -> str:
        return self.lab.pod(pod).ipv4

    def mesh_counters(self, node: str) -> dict[str, int]:
        with open_mesh(loader.pin_dir(self.lab.node(node).instance)) as m:
            return m.counters()

    def fastpath_counters(self) -> dict[str, int]:
        """The fast path's counters, summed over both nodes."""
        total: dict[str, int] = {}
        for node in self.lab.nodes.values():
            with open_pinned(loader.pin_dir(node.instance)) as m:
                for k, v in m.counters().items():
                    total[k] = total.get(k, 0) + v
        return total

    def tunnels_to(self, pod: str) -> list[dict[str, Any]]:
        """What the destination node's Envoy logged for tunnels to `pod`."""
        dst = self.lab.pod(pod)
        return [t for t in self.cluster.agent_of(pod).tunnels()
                if t.get("authority", "").startswith(dst.ipv4 + ":")]

    def set_modes(self, **changes: str) -> None:
        self.cluster.set_pods(annotations=mtls_annotations({**MODES, **changes}), labels=LABELS)

    def wait_captured(self, *pods: str) -> None:
        def ready() -> bool:
            return all(f"{NAMESPACE}/{p}" in self.cluster.agent_of(p).status()["capture_ready"] for p in pods)
        waiting.wait_until(ready, 60, f"capture listeners of {pods} up")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    require_lab_with_envoy()
    lab = Lab(8, nodes=2)
    lab.up()
    cluster = LabCluster(lab, envoy=True, certs=True, ca_serve=True)
    try:
        cluster.up()
        cluster.set_pods(annotations=mtls_annotations(MODES), labels=LABELS)
        m = Mesh(lab, cluster)
        for p in ("pod2", "pod4", "pod6"):
            m.serve(p)
        m.wait_captured("pod1", "pod2", "pod3", "pod4")
        yield m
    finally:
        for s in getattr(locals().get("m"), "servers", []):
            s.kill()
            s.wait()
        cluster.down()
        lab.down()
    assert leftovers(lab.id) == []


class Capture:
    """tcpdump on the link between the nodes (node1's port of the fabric bridge)."""

    def __init__(self, lab: Lab, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(["ip", "netns", "exec", lab.fabric_netns, "tcpdump", "-i", "n1", "--immediate-mode", "-U", "-s", "0",
                                      "-w", str(path), "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        waiting.wait_until(lambda: path.exists(), 10, "tcpdump started")
        time.sleep(0.3)  # deliberate margin: the file exists a moment before the capture sees every packet

    def stop(self) -> bytes:
        time.sleep(0.3)  # deliberate: packets still in flight reach the capture before it stops
        self.proc.terminate()
        self.proc.wait(10)
        return self.path.read_bytes()

    def flows(self) -> set[tuple[str, str]]:
        """(source, destination) ip.port pairs of the captured TCP packets."""
        out = subprocess.run(["tcpdump", "-r", str(self.path), "-nn", "-q"], capture_output=True, text=True).stdout
        pairs = set()
        for line in out.splitlines():
            parts = line.split()
            if len(parts) > 4 and parts[1] == "IP":
                pairs.add((parts[2], parts[4].rstrip(":")))
        return pairs


def test_strict_pods_talk_through_hbone_and_the_wire_carries_only_tls(mesh: Mesh, tmp_path: Path) -> None:
    marker = "marker-3f9a1c-never-on-the-wire"
    cap = Capture(mesh.lab, tmp_path / "link.pcap")
    answer = ask(mesh.lab, "pod1", mesh.ip("pod2"), PORT, marker)
    raw = cap.stop()
    # The app sees plain TCP: its bytes came back, and getpeername() is the pod it asked for.
    assert answer.startswith(f"echo {marker} from") and answer.endswith(f"| peer {mesh.ip('pod2')}"), answer
    assert marker.encode() not in raw
    assert len(raw) > 2000, "the capture saw the tunnel"  # the TLS handshake alone is bigger
    flows = cap.flows()
    assert flows, "tcpdump saw nothing"
    assert all(a.endswith(".15008") or b.endswith(".15008") for a, b in flows), flows  # only HBONE crossed
    assert not any(b.endswith(f".{PORT}") for _, b in flows), flows
    # The receiving Envoy names the source pod's SPIFFE ID (from its certificate) for that tunnel.
    waiting.wait_until(lambda: any(t["downstream_peer"] == sid("pod1") for t in mesh.tunnels_to("pod2")), 10,
                       "the tunnel in node2's access log")
    t = next(t for t in mesh.tunnels_to("pod2") if t["downstream_peer"] == sid("pod1"))
    assert t["authority"] == f"{mesh.ip('pod2')}:{PORT}" and t["response_code"] == 200
    assert t["forwarded"].startswith(f'for="{mesh.ip("pod1")}:')



def test_an_ipv6_socket_dialling_an_ipv4_pod_is_tunnelled_too(mesh: Mesh, tmp_path: Path) -> None:
    """Java's sockets (and any dual-stack client) dial IPv4 as IPv6 sockets to IPv4-mapped addresses: such a
    connection is captured and tunnelled like an IPv4 one, with the pod's IPv4 address as the authority."""
    marker = "marker-mapped-7c2e-never-on-the-wire"
    mapped = f"::ffff:{mesh.ip('pod2')}"
    cap = Capture(mesh.lab, tmp_path / "link.pcap")
    answer = ask(mesh.lab, "pod1", mapped, PORT, marker)
    raw = cap.stop()
    assert answer.startswith(f"echo {marker} from") and answer.endswith(f"| peer {mapped}"), answer
    assert marker.encode() not in raw
    flows = cap.flows()  # the stream may ride a tunnel already open (no handshake then), but it crossed
    assert flows and all(a.endswith(".15008") or b.endswith(".15008") for a, b in flows), flows
    waiting.wait_until(lambda: any(t["forwarded"].startswith(f'for="{mesh.ip("pod1")}:')
                                   for t in mesh.tunnels_to("pod2")), 10, "the tunnel in node2's access log")

def test_permissive_accepts_plaintext_strict_refuses_it_disable_sends_it(mesh: Mesh, tmp_path: Path) -> None:
    # permissive pod4 accepts plaintext from the non-enrolled pod5 (another node)
    cap = Capture(mesh.lab, tmp_path / "plain.pcap")
    assert ask(mesh.lab, "pod5", mesh.ip("pod4"), PORT, "plain-to-permissive").startswith("echo plain-to-permissive")
    assert b"plain-to-permissive" in cap.stop()
    # strict pod2 refuses it: the SYN is dropped in the kernel before any socket of the app sees it
    before = mesh.mesh_counters("node2")["mesh_strict_dropped"]
    assert ask(mesh.lab, "pod5", mesh.ip("pod2"), PORT, "plain-to-strict", timeout=2) == "ERR TimeoutError"
    assert mesh.mesh_counters("node2")["mesh_strict_dropped"] > before
    # an enrolled pod sends plaintext to a pod that is not enrolled (disable)
    cap = Capture(mesh.lab, tmp_path / "to-disabled.pcap")
    assert ask(mesh.lab, "pod1", mesh.ip("pod6"), PORT, "strict-to-disabled").startswith("echo strict-to-disabled")
    assert b"strict-to-disabled" in cap.stop()
    # and mTLS to a permissive one
    cap = Capture(mesh.lab, tmp_path / "to-permissive.pcap")
    assert ask(mesh.lab, "pod3", mesh.ip("pod4"), PORT, "mtls-to-permissive").startswith("echo mtls-to-permissive")
    assert b"mtls-to-permissive" not in cap.stop()
    # same node keeps the kernel path: pod6 (node2) reaches strict pod2 directly
    assert ask(mesh.lab, "pod6", mesh.ip("pod2"), PORT, "same-node").startswith("echo same-node")


def test_a_clusterip_whose_backend_is_on_the_other_node_is_encrypted(mesh: Mesh, tmp_path: Path) -> None:
    vip = "10.96.9.9"
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "strict-echo", "namespace": NAMESPACE},
           "spec": {"clusterIP": vip, "selector": {"app": "pod2"},
                    "ports": [{"name": "tcp", "port": 80, "targetPort": PORT, "protocol": "TCP"}]}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "strict-echo-1", "namespace": NAMESPACE,
                        "labels": {"kubernetes.io/service-name": "strict-echo"}},
           "addressType": "IPv4", "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP"}],
           "endpoints": [{"addresses": [mesh.ip("pod2")], "conditions": {"ready": True}}]}
    (mesh.cluster.manifests / "strict-echo.yaml").write_text(yaml.safe_dump_all([svc, eps]))
    try:
        waiting.wait_until(lambda: ask(mesh.lab, "pod1", vip, 80).startswith("echo"), 20, "the ClusterIP served")
        cap = Capture(mesh.lab, tmp_path / "vip.pcap")
        answer = ask(mesh.lab, "pod1", vip, 80, "via-the-vip")
        raw = cap.stop()
        assert answer.startswith("echo via-the-vip") and answer.endswith(f"| peer {vip}"), answer
        assert b"via-the-vip" not in raw and all(".15008" in a + b for a, b in cap.flows())
    finally:
        (mesh.cluster.manifests / "strict-echo.yaml").unlink()


def test_bad_peers_are_refused_without_disturbing_other_tunnels(mesh: Mesh, tmp_path: Path) -> None:
    lab, dst = mesh.lab, mesh.ip("pod2")
    addr, authority = f"{dst}:15008", f"{dst}:{PORT}"
    good = credential(tmp_path, "pod3", sid("pod3"), lab.id)
    # A tunnel that stays open through all of it: a long-lived captured connection pod1 -> pod2.
    keeper = lab.popen("pod1", [sys.executable, "-c", KEEPER, dst, str(PORT)], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
    assert keeper.stdout is not None and keeper.stdin is not None
    assert keeper.stdout.readline().startswith("echo first"), "the kept tunnel works"
    stalled = lab.popen("pod3", [sys.executable, "-m", "tests.hbone_client", "--addr", addr, "--ca", str(good.ca),
                                 "--stall", "30", "--timeout", "40"], stdout=subprocess.PIPE, text=True)
    try:
        def refused(cred: Credential | None, *extra: str) -> dict[str, Any]:
            return hbone(lab, "pod3", addr, cred, "--authority", authority, *extra, ca=good.ca)

        ok = refused(good, "--send", "tunnel-ok\n")
        assert ok["status"] == 200 and ok["reply"].startswith("echo tunnel-ok"), ok
        other_td = credential(tmp_path, "other-td", f"spiffe://other.domain/ns/{NAMESPACE}/sa/pod3", lab.id)
        assert refused(other_td)["error"] and refused(other_td)["status"] is None  # wrong trust domain
        forged = credential(tmp_path, "forged", sid("pod3"), lab.id, ca=CertificateAuthority.create_root())
        assert refused(forged)["status"] is None  # our identity, signed by someone else
        expired = credential(tmp_path, "expired", sid("pod3"), lab.id, not_before_offset=-7200, ttl=3600)
        assert refused(expired)["status"] is None
        assert refused(None)["status"] is None  # no client certificate
        assert refused(good, "--tls12")["status"] is None  # TLS 1.2 only
        assert refused(good, "--alpn", "")["status"] is None  # no ALPN
        assert refused(good, "--alpn", "http/1.1")["status"] is None  # not h2
        assert refused(good, "--method", "GET")["status"] == 400  # not a CONNECT
        elsewhere = hbone(lab, "pod3", addr, good, "--authority", f"{mesh.ip('pod4')}:{PORT}", ca=good.ca)
        assert elsewhere["status"] == 400  # a pod of that node, but not the one this listener serves
        assert hbone(lab, "pod3", addr, good, "--authority", f"10.99.0.1:{PORT}", ca=good.ca)["status"] == 400
        assert hbone(lab, "pod3", addr, good, "--authority", f"{dst}:9", ca=good.ca)["status"] == 503  # refused upstream
        garbage = refused(good, "--garbage")
        assert garbage["status"] is None and garbage["error"], garbage
        # The kept tunnel and new ones are untouched.
        keeper.stdin.write("second\n")
        keeper.stdin.flush()
        assert keeper.stdout.readline().startswith("echo second")
        assert refused(good, "--send", "still-ok\n")["reply"].startswith("echo still-ok")
        assert ask(lab, "pod1", dst, PORT, "new-tunnel").startswith("echo new-tunnel")
    finally:
        for p in (keeper, stalled):
            p.kill()
            p.wait()


KEEPER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
def ask(text):
    s.sendall(text.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        data += s.recv(4096)
    print(data.decode().strip(), flush=True)
ask("first")
for line in sys.stdin:
    ask(line.strip())
"""


def test_bit_exact_across_nodes_with_half_close(mesh: Mesh) -> None:
    from tests import traffic

    before = mesh.fastpath_counters()
    t = traffic.start(mesh.lab, "pod2", "pod1", mesh.ip("pod2"), 7600, conns=100, msgs=6, max_size=16 << 20,
                      half_close=True)
    moved = traffic.finish(t, 100, timeout=280)
    assert moved > 0
    # The legs into the node Envoys (capture on node1, delivery on node2) were spliced, and those that sent bulk
    # moved to TCP before they could queue much: the node's splice budget was never spent.
    rise = {k: v - before.get(k, 0) for k, v in mesh.fastpath_counters().items()}
    assert rise["sockets_inserted"] >= 400 and rise["proxy_bulk_to_tcp"] > 0 and rise["guard_to_tcp"] == 0, rise
    # every one of them went through its own CONNECT stream (Envoy logs a stream when it ends)
    waiting.wait_until(lambda: sum(1 for tt in mesh.tunnels_to("pod2") if tt["authority"].endswith(":7600")) >= 100,
                       15, "100 tunnels in node2's access log")


# One connection, many small request/response rounds (what latency is made of).
ROUNDS = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
f = c.makefile("rb")
for i in range(int(sys.argv[3])):
    c.sendall(b"q%d\n" % i)
    assert f.readline().startswith(b"echo q%d " % i)
print("ok", flush=True)
"""


def test_proxy_legs_are_spliced_for_small_exchanges_and_bulk_waits_on_tcp(mesh: Mesh) -> None:
    # Small rounds: both legs (app <-> node1's Envoy, node2's Envoy <-> app) stay spliced.
    before = mesh.fastpath_counters()
    out = mesh.lab.run("pod1", [sys.executable, "-c", ROUNDS, mesh.ip("pod2"), str(PORT), "2000"],
                       capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr[-500:]
    rise = {k: v - before.get(k, 0) for k, v in mesh.fastpath_counters().items()}
    assert rise["sockets_inserted"] == 4 and rise["redirect_verdicts"] >= 4, rise
    assert rise["proxy_bulk_to_tcp"] == rise["fallbacks"] == 0, rise

    # Bulk to a receiver that reads nothing: the sender's leg moves to TCP and waits, as through sidecars; spliced
    # it would have queued everything in node1's Envoy's socket (no flow control on spliced bytes).
    size = 256 << 20
    with PausedTransfer(mesh.lab, "pod2", "pod1", size) as transfer:
        before, pages = mesh.fastpath_counters(), tcp_memory_pages()
        transfer.start()
        waiting.wait_until(lambda: mesh.fastpath_counters()["proxy_bulk_to_tcp"] > before["proxy_bulk_to_tcp"], 30,
                           "the bulk sender's leg moved to TCP")
        peak = pages
        for _ in range(100):  # a second for the sender to fill what it may
            peak = max(peak, tcp_memory_pages())
            time.sleep(0.01)
        assert transfer.sending(), "the client finished while its receiver read nothing"
        assert (peak - pages) * 4096 < 128 << 20, (pages, peak)  # socket and Envoy buffers, not the 256 MiB
        transfer.finish()
    assert mesh.fastpath_counters()["guard_to_tcp"] == before["guard_to_tcp"]



def test_enrollment_flip_takes_new_connections_and_lets_old_ones_finish(mesh: Mesh) -> None:
    from tests import traffic

    lab = mesh.lab
    mesh.serve("pod6", 7700)
    # Plaintext streams pod5 -> pod6 that outlive the change (a pause between messages).
    old = traffic.start(lab, "pod6", "pod5", mesh.ip("pod6"), 7701, conns=4, msgs=30, max_size=256 << 10, pause=0.2)
    waiting.wait_until(lambda: traffic.established(lab, "pod6", 7701) == 4, 20,
                       "the 4 plaintext streams established")  # on the plaintext path, before the flip
    flipped = time.monotonic()
    mesh.set_modes(pod5="strict", pod6="strict")
    try:
        def encrypted_new_connection() -> bool:
            ask(lab, "pod5", mesh.ip("pod6"), 7700, "after-flip")
            return any(t["downstream_peer"] == sid("pod5") for t in mesh.tunnels_to("pod6"))
        waiting.wait_until(encrypted_new_connection, 30, "a new pod5 -> pod6 connection through HBONE")
        print(f"enrollment flip -> first encrypted new connection: {time.monotonic() - flipped:.2f}s")
        traffic.finish(old, 4, timeout=120)  # every old stream finished intact, on the path it started on
    finally:
        mesh.set_modes()
        waiting.wait_until(lambda: f"{NAMESPACE}/pod5" not in mesh.cluster.agents["node1"].status()["capture_ready"],
                           30, "pod5 back to plaintext")


def test_svid_rotation_and_agent_kills_break_no_stream(mesh: Mesh) -> None:
    from tests import traffic

    lab, n1, n2 = mesh.lab, mesh.cluster.agents["node1"], mesh.cluster.agents["node2"]
    envoys = (n1.pid("envoy"), n2.pid("envoy"))
    serial_before = {c["spiffe_id"]: c["serial"] for c in n2.status()["certs"]["certificates"]}
    t = traffic.start(lab, "pod2", "pod1", mesh.ip("pod2"), 7800, conns=8, msgs=40, max_size=1 << 20, pause=0.15)
    waiting.wait_until(lambda: traffic.established(lab, "pod2", 7800) == 8, 20, "the 8 streams established at pod2")
    assert n1.refresh_certs() >= 1 and n2.refresh_certs() >= 1
    waiting.wait_until(lambda: {c["spiffe_id"]: c["serial"] for c in n2.status()["certs"]["certificates"]}[sid("pod2")]
                       != serial_before[sid("pod2")], 20, "pod2's SVID rotated")
    for agent in (n2, n1):  # SIGKILL: no goodbye to Envoy, no cleanup of the maps
        agent.kill("agent")
    time.sleep(0.5)  # deliberate: a while with no agent on either node; traffic must not notice
    assert ask(lab, "pod1", mesh.ip("pod2"), PORT, "while-no-agent").startswith("echo while-no-agent")
    for agent in (n1, n2):
        agent.start_agent()
    traffic.finish(t, 8, timeout=180)
    assert (n1.pid("envoy"), n2.pid("envoy")) == envoys  # Envoy kept running, and kept its tunnels
    mesh.wait_captured("pod1", "pod2")
    assert ask(lab, "pod1", mesh.ip("pod2"), PORT, "after-restart").startswith("echo after-restart")
    st = n2.status()
    assert st["xds"]["nacks_total"] == 0 and st["certs"]["failing"] == 0


WAYPOINT_PORT = 15008


def waypoint_bootstrap(cert: Credential, admin: Path, log: Path, target: str) -> dict[str, Any]:
    """An Envoy configured by hand, the way an Istio waypoint is: terminate HBONE (CONNECT over mTLS on
    15008), hand the stream to an internal listener, originate HBONE again towards `target`. Nothing here
    comes from meshaccel's xDS."""
    tls_files = {"tls_certificates": [{"certificate_chain": {"filename": str(cert.cert)},
                                       "private_key": {"filename": str(cert.key)}}],
                 "validation_context": {"trusted_ca": {"filename": str(cert.ca)},
                                        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {
                                            "prefix": "spiffe://cluster.local/"}}]},
                 "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
                 "alpn_protocols": ["h2"]}
    h2 = {"allow_connect": True, "initial_stream_window_size": 4194304, "initial_connection_window_size": 16777216}
    log_format = {"json_format": {"peer": "%DOWNSTREAM_PEER_URI_SAN%", "authority": "%REQ(:AUTHORITY)%",
                                  "code": "%RESPONSE_CODE%", "upstream_peer": "%UPSTREAM_PEER_URI_SAN%"}}
    return {
        "node": {"id": "waypoint", "cluster": "waypoint"},
        "admin": {"address": {"pipe": {"path": str(admin)}}},
        "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"}}],
        "static_resources": {
            "listeners": [
                {"name": "connect_terminate",
                 "address": {"socket_address": {"address": "0.0.0.0", "port_value": WAYPOINT_PORT}},
                 "filter_chains": [{
                     "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                         "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                         "require_client_certificate": True, "common_tls_context": tls_files}},
                     "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                         "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                                  ".HttpConnectionManager",
                         "stat_prefix": "connect_terminate", "codec_type": "HTTP2", "http2_protocol_options": h2,
                         "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                         "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                             "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                             "path": str(log), "log_format": log_format}}],
                         "route_config": {"virtual_hosts": [{"name": "any", "domains": ["*"], "routes": [{
                             "match": {"connect_matcher": {}},
                             "route": {"cluster": "main_internal",
                                       "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}]}]},
                         "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                             "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]},
                {"name": "main_internal", "internal_listener": {},
                 "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                     "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                     "stat_prefix": "originate", "cluster": "connect_originate",
                     "tunneling_config": {"hostname": target}}}]}]},
            ],
            "clusters": [
                {"name": "main_internal", "type": "STATIC", "connect_timeout": "2s",
                 "load_assignment": {"cluster_name": "main_internal", "endpoints": [{"lb_endpoints": [{"endpoint": {
                     "address": {"envoy_internal_address": {"server_listener_name": "main_internal"}}}}]}]}},
                {"name": "connect_originate", "type": "STATIC", "connect_timeout": "2s",
                 "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                     "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                     "explicit_http_config": {"http2_protocol_options": h2}}},
                 "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                     "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                     "common_tls_context": tls_files}},
                 "load_assignment": {"cluster_name": "connect_originate", "endpoints": [{"lb_endpoints": [{"endpoint": {
                     "address": {"socket_address": {"address": target.rsplit(":", 1)[0],
                                                    "port_value": WAYPOINT_PORT}}}}]}]}},
            ],
        },
    }


def test_interop_with_a_waypoint_we_did_not_configure(mesh: Mesh, tmp_path: Path) -> None:
    """pod1 (node1) -> the waypoint (pod8, node2, Istio ambient) -> pod2 (node2): our node originates HBONE to
    it, it terminates that and originates HBONE to our node, all with certificates from our CA."""
    from accel.envoy import envoy_binary

    lab = mesh.lab
    wp_id = f"spiffe://{TD}/ns/{NAMESPACE}/sa/waypoint"
    cert = credential(tmp_path, "waypoint", wp_id, lab.id)
    log, admin = tmp_path / "waypoint-access.log", tmp_path / "waypoint-admin.sock"
    boot = tmp_path / "waypoint.json"
    boot.write_text(json.dumps(waypoint_bootstrap(cert, admin, log, f"{mesh.ip('pod2')}:{PORT}")))
    wp = lab.popen("pod8", [envoy_binary(), "-c", str(boot), "--disable-hot-restart", "-l", "warning",
                            "--log-path", str(tmp_path / "waypoint.log")])
    try:
        waiting.wait_until(lambda: admin.exists(), 20, "the waypoint's admin socket")
        answer = ""

        def through_waypoint() -> bool:
            nonlocal answer
            answer = ask(lab, "pod1", mesh.ip("pod8"), PORT, "via-waypoint")
            return answer.startswith("echo via-waypoint")
        waiting.wait_until(through_waypoint, 20, "pod1 -> waypoint -> pod2")
        assert answer.endswith(f"| peer {mesh.ip('pod8')}"), answer  # the app asked for the waypoint's address
        # The waypoint saw pod1's identity; our node2 saw the waypoint's, both from certificates.
        waiting.wait_until(lambda: log.exists() and sid("pod1") in log.read_text(), 10, "the waypoint's access log")
        entry = json.loads(next(ln for ln in log.read_text().splitlines() if sid("pod1") in ln))
        assert entry["code"] == 200 and entry["authority"] == f"{mesh.ip('pod8')}:{PORT}"
        waiting.wait_until(lambda: any(t["downstream_peer"] == wp_id for t in mesh.tunnels_to("pod2")), 10,
                           "node2's tunnel from the waypoint")
    finally:
        wp.terminate()
        wp.wait(10)


def test_bad_input_unknown_mode_no_service_account(mesh: Mesh) -> None:
    n1 = mesh.cluster.agents["node1"]
    # An unknown value on the pod is reported; the namespace's value applies (strict here).
    mesh.cluster.set_pods(mtls=MtlsMode.STRICT, annotations=mtls_annotations({**MODES, "pod7": "sometimes"}),
                          labels=LABELS, service_accounts={"pod7": None})
    try:
        mesh.wait_captured("pod7")
        status = n1.status()
        assert status["xds"]["mesh_pods"][f"{NAMESPACE}/pod7"] == f"spiffe://{TD}/ns/{NAMESPACE}/sa/default"
        metrics = urllib.request.urlopen(n1.url + "/metrics", timeout=5).read().decode()
        assert 'meshaccel_bad_input_total{reason="mtls_annotation"}' in metrics
        assert "sometimes" in (n1.dir / "agent.log").read_text()
    finally:
        mesh.set_modes()


def test_ca_down_tunnels_keep_working_new_identities_wait(mesh: Mesh) -> None:
    lab, n1 = mesh.lab, mesh.cluster.agents["node1"]
    n1.kill("ca")
    try:
        assert ask(lab, "pod1", mesh.ip("pod2"), PORT, "ca-down").startswith("echo ca-down")  # cached SVIDs
        mesh.cluster.set_pods(annotations=mtls_annotations({**MODES, "pod7": "strict"}), labels=LABELS,
                              service_accounts={"pod7": "newcomer"})
        newcomer = f"spiffe://{TD}/ns/{NAMESPACE}/sa/newcomer"

        def reported() -> bool:
            certs = n1.status()["certs"]
            return any(c["spiffe_id"] == newcomer and c["failures"] and c["serial"] is None
                       for c in certs["certificates"])
        waiting.wait_until(reported, 30, "the newcomer's failing CSR in the status")
        assert f"{NAMESPACE}/pod7" not in n1.status()["xds"]["mesh_pods"]  # no listener without its SVID
        assert ask(lab, "pod1", mesh.ip("pod2"), PORT, "still-up").startswith("echo still-up")
    finally:
        n1.start_ca()
    waiting.wait_until(lambda: n1.status()["xds"]["mesh_pods"].get(f"{NAMESPACE}/pod7") == newcomer, 60,
                       "the newcomer served once the CA is back")
    mesh.set_modes()


def test_tunnels_are_flows_with_both_identities(mesh: Mesh) -> None:
    """The node Envoys stream their access logs to their agents (gRPC ALS): a tunnel is a flow with the
    source and destination SPIFFE IDs taken from the certificates, as `accel observe` shows it."""
    assert ask(mesh.lab, "pod1", mesh.ip("pod2"), PORT, "observed").startswith("echo observed")
    n2 = mesh.cluster.agents["node2"]

    def inbound_tunnel() -> list[dict[str, Any]]:
        out = subprocess.run([sys.executable, "-m", "accel.cli", "observe", "--agent", n2.url, "--output", "json",
                              "--namespace", NAMESPACE], capture_output=True, text=True, timeout=30)
        flows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.strip()]
        return [f for f in flows if f["path"] == "tunnel" and f["src"]["identity"] == sid("pod1")
                and f["dst"]["ip"] == mesh.ip("pod2") and f["dst"]["port"] == PORT]
    waiting.wait_until(lambda: bool(inbound_tunnel()), 15, "the tunnel as a flow on node2")
    f = inbound_tunnel()[-1]
    assert f["encrypted"] and f["dst"]["identity"] == sid("pod2") and f["verdict"] == "forwarded", f
