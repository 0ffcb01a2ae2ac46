"""Flows end to end in a two-node lab with the real agents, real eBPF programs and real Envoys: a
connection on each path (spliced, plain TCP, the mTLS tunnel, L7 through Envoy), a denied and a refused
one, each read back with the real `accel observe --output json`, its bytes held against what really
crossed; the Istio metrics against the same flows; a flood that overflows a small ring buffer; the map.

  node1: pod1 (strict: tunnel client)   pod3 (server: spliced, denied, flood)   pod5 (the client)
  node2: pod2 (strict: tunnel server)   pod4 (server: plain TCP)                pod6 (HTTP: the L7 backend)
Services: lab/spliced (-> pod3:7001), lab/web (L7, -> pod6:8080), lab/nobody (no backend).
The programs are compiled with a 16 KiB flow ring buffer (136 events), ample for a live reader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from accel.lab import Lab
from accel.lab_agent import NAMESPACE, LabCluster
from accel.state.model import MTLS_ANNOTATION
from tests import waiting
from tests.conftest import leftovers, require_lab_with_envoy
from tests.known_bytes import FIRST_SEND
from tests.mesh_helpers import ClusterLab

pytestmark = [pytest.mark.lab, pytest.mark.envoy, pytest.mark.slow]

RING_BYTES = 4 * 4096  # a power of 2 times the page size: what the kernel takes for a ring buffer
SPLICED_PORT, TCP_PORT, TUNNEL_PORT, DENIED_PORT, FLOOD_PORT, HTTP_PORT = 7001, 7002, 7003, 7004, 7005, 8080
SPLICED_VIP, WEB_VIP, NOBODY_VIP = "10.96.30.1", "10.96.30.2", "10.96.30.3"
REPLY = {SPLICED_PORT: 200_000, TCP_PORT: 150_000, TUNNEL_PORT: 80_000, DENIED_PORT: 10, FLOOD_PORT: 300}
HTTP_REPLY = 70_000
FLOOD = 400  # connections: 800 events, six times what the ring holds


def sid(pod: str) -> str:
    return f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{pod}"


def service(name: str, vip: str, target: int, backend: str | None, l7: bool = False) -> list[dict[str, Any]]:
    """A ClusterIP Service on port 80 and its EndpointSlice: `backend` (an address) or none at all."""
    svc: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"clusterIP": vip, "selector": {"app": name},
                                    "ports": [{"name": "tcp", "port": 80, "targetPort": target, "protocol": "TCP"}]}}
    if l7:
        svc["metadata"]["annotations"] = {"meshaccel.io/l7": "true"}
    if backend is None:
        return [svc]
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": f"{name}-1", "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4", "ports": [{"name": "tcp", "port": target, "protocol": "TCP"}],
           "endpoints": [{"addresses": [backend], "conditions": {"ready": True}}]}
    return [svc, eps]


class FlowLab(ClusterLab):
    def start(self, pod: str, *argv: str) -> None:
        p = self.lab.popen(pod, [sys.executable, "-m", "tests.known_bytes", *argv], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "listening", f"server in {pod} did not start"
        self.procs.append(p)

    def send(self, pod: str, ip: str, port: int, size: int, count: int = 1) -> list[dict[str, Any]]:
        out = self.lab.run(pod, [sys.executable, "-m", "tests.known_bytes", "send", ip, str(port), str(size), str(count)],
                           capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        doc: list[dict[str, Any]] = json.loads(out.stdout)
        return doc

    def send_one(self, pod: str, ip: str, port: int, size: int, server_port: int = 0) -> dict[str, Any]:
        """One connection that must work: both sides got every byte, in order. `server_port`: where the
        server listens when `port` is a service's."""
        server_port = server_port or port
        before = len(self.served(server_port))
        r = self.send(pod, ip, port, size)[0]
        assert r.get("ok") and r["received"] == REPLY[server_port], r
        waiting.wait_until(lambda: len(self.served(server_port)) > before, 10, "the server's record")
        assert self.served(server_port)[before:] == [f"{size} ok"], self.served(server_port)
        return r

    def served(self, port: int) -> list[str]:
        """What the servers logged of their connections on `port`, in order: "received ok|bad"."""
        out = []
        for log in self.logs.glob("*.log"):
            for line in log.read_text().splitlines():
                at, _peer_ip, _peer_port, received, ok = line.split()
                if int(at) == port:
                    out.append(f"{received} {ok}")
        return out

    def assert_end(self, ep: dict[str, Any], pod: str, port: int | None = None) -> None:
        """A flow's end is this pod (at this port), named as the model names it."""
        assert ep["pod"] == f"{NAMESPACE}/{pod}" and ep["workload"] == pod and ep["namespace"] == NAMESPACE, ep
        assert ep["identity"] == sid(pod) and ep["ip"] == self.ip(pod), ep
        if port is not None:
            assert ep["port"] == port, ep

    def http(self, pod: str, ip: str, port: int, size: int) -> dict[str, Any]:
        out = self.lab.run(pod, [sys.executable, "-m", "tests.known_bytes", "http-send", ip, str(port), str(size)],
                           capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc


def observe(url: str, *filters: str) -> list[dict[str, Any]]:
    """The real CLI: `accel observe --output json --all` and the filters."""
    out = subprocess.run([sys.executable, "-m", "accel.cli", "observe", "--agent", url, "--output", "json", "--all",
                          *filters], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def flows_of(url: str, want: Callable[[dict[str, Any]], bool], count: int, what: str,
             *filters: str) -> list[dict[str, Any]]:
    """Wait until `count` flows satisfy `want`; those flows, oldest first."""
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        found[:] = [f for f in observe(url, *filters) if want(f)]
        return len(found) >= count
    waiting.wait_until(enough, 20, f"{what} ({len(found)} of {count} flows)")
    return found


def from_port(sport: int, source: str = "kernel") -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["src"]["port"] == sport and f["source"] == source


def by_event(flows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {f["event"]: f for f in flows}
    assert len(out) == len(flows), f"one flow per event: {flows}"
    return out


def istio(url: str, metric: str, **labels: str) -> float:
    """The sum of `metric`'s samples (from the agent's /metrics) whose labels include `labels`."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def tcp_numbers(flows: list[dict[str, Any]]) -> dict[str, float]:
    """What Istio's TCP metrics must say of these flows."""
    return {"opened": sum(f["event"] in ("open", "refused") for f in flows),
            "closed": sum(f["event"] in ("close", "refused") for f in flows),
            "received": sum(f["bytes_sent"] for f in flows if f["event"] != "open"),
            "sent": sum(f["bytes_received"] for f in flows if f["event"] != "open")}


def metrics_match(url: str, flows: Callable[[], list[dict[str, Any]]], **labels: str) -> None:
    """Istio's four TCP series selected by `labels` carry the numbers of `flows()` (waited for: the two
    are read at different moments)."""
    last: dict[str, Any] = {}

    def same() -> bool:
        want = tcp_numbers(flows())
        got = {"opened": istio(url, "istio_tcp_connections_opened_total", **labels),
               "closed": istio(url, "istio_tcp_connections_closed_total", **labels),
               "received": istio(url, "istio_tcp_received_bytes_total", **labels),
               "sent": istio(url, "istio_tcp_sent_bytes_total", **labels)}
        last.update(want=want, got=got)
        return want == got and want["opened"] > 0
    waiting.wait_until(same, 20, f"Istio metrics {labels} = the flows' numbers (last: {last})")


@pytest.fixture(scope="module")
def flab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowLab]:
    require_lab_with_envoy()
    logs = tmp_path_factory.mktemp("flows-lab")
    lab = Lab(6, nodes=2, attach=False)
    lab.up()
    cluster = LabCluster(lab, envoy=True, certs=True)
    fl = FlowLab(lab, cluster, logs)
    try:
        lab.attach_bpf(defines={"FLOW_RING_BYTES": str(RING_BYTES)})
        cluster.up()
        cluster.set_pods(annotations={p: {MTLS_ANNOTATION: "strict"} for p in ("pod1", "pod2")})
        docs = [*service("spliced", SPLICED_VIP, SPLICED_PORT, fl.ip("pod3")),
                *service("web", WEB_VIP, HTTP_PORT, fl.ip("pod6"), l7=True), *service("nobody", NOBODY_VIP, 9999, None)]
        (cluster.manifests / "flows-services.yaml").write_text(yaml.safe_dump_all(docs))
        fl.start("pod3", "serve", str(logs / "pod3.log"), *(f"{p}:{REPLY[p]}" for p in (SPLICED_PORT, DENIED_PORT, FLOOD_PORT)))
        fl.start("pod4", "serve", str(logs / "pod4.log"), f"{TCP_PORT}:{REPLY[TCP_PORT]}")
        fl.start("pod2", "serve", str(logs / "pod2.log"), f"{TUNNEL_PORT}:{REPLY[TUNNEL_PORT]}")
        fl.start("pod6", "http-serve", str(logs / "pod6.http"), str(HTTP_PORT), str(HTTP_REPLY))
        waiting.wait_until(lambda: "lab/pod1" in fl.agent("node1").status()["capture_ready"]
                           and "lab/pod2" in fl.agent("node2").status()["capture_ready"], 60, "tunnels up")
        waiting.wait_until(lambda: fl.http("pod5", WEB_VIP, 80, 10).get("via_envoy") is True, 60,
                           "lab/web served by node1's Envoy")
        yield fl
    finally:
        fl.down()
    assert leftovers(lab.id) == []


def test_spliced_connection_through_a_clusterip(flab: FlowLab) -> None:
    r = flab.send_one("pod5", SPLICED_VIP, 80, 300_000, SPLICED_PORT)
    url = flab.agent("node1").url
    flows = by_event(flows_of(url, from_port(r["sport"]), 2, "the spliced connection's open and close",
                              "--pod", "lab/pod5", "--service", "lab/spliced"))
    for f in flows.values():
        assert f["path"] == "spliced" and not f["encrypted"] and f["verdict"] == "forwarded", f
        assert f["service"] == "lab/spliced" and f["service_ip"] == SPLICED_VIP and f["service_port"] == 80, f
        flab.assert_end(f["src"], "pod5", r["sport"])
        flab.assert_end(f["dst"], "pod3", SPLICED_PORT)
        assert f["cookie"] == flows["open"]["cookie"] != 0
    close = flows["close"]
    # The bytes bypassed TCP: the kernel counts what its sk_msg verdicts saw (the first sendmsg(), whose
    # verdict covers the rest), a lower bound it flags as such.
    assert close["bytes_exact"] is False, close
    assert FIRST_SEND <= close["bytes_sent"] <= r["sent"], close
    assert 0 <= close["bytes_received"] <= r["received"], close
    assert close["duration_seconds"] > 0


def test_plain_tcp_to_a_pod_of_the_other_node(flab: FlowLab) -> None:
    r = flab.send_one("pod5", flab.ip("pod4"), TCP_PORT, 250_000)
    # Reported by both nodes: by the client's socket on node1, by the server's on node2 (its client is elsewhere).
    for node in ("node1", "node2"):
        flows = by_event(flows_of(flab.agent(node).url, from_port(r["sport"]), 2, f"the TCP connection on {node}",
                                  "--pod", "lab/pod4", "--port", str(TCP_PORT)))
        for f in flows.values():
            assert f["path"] == "tcp" and not f["encrypted"] and f["verdict"] == "forwarded" and f["service"] == "", f
            flab.assert_end(f["src"], "pod5", r["sport"])
            flab.assert_end(f["dst"], "pod4", TCP_PORT)
        close = flows["close"]
        assert close["bytes_exact"] is True, close
        assert (close["bytes_sent"], close["bytes_received"]) == (r["sent"], r["received"]), close


def test_tunnel_between_enrolled_pods_of_two_nodes(flab: FlowLab) -> None:
    r = flab.send_one("pod1", flab.ip("pod2"), TUNNEL_PORT, 120_000)
    # node1's Envoy took the connection at pod1's capture listener: the flow names pod1 and where it went,
    # with pod2's identity from its certificate and the application's bytes each way.
    flows = by_event(flows_of(flab.agent("node1").url, from_port(r["sport"], "envoy"), 2, "the outbound tunnel",
                              "--pod", "lab/pod1"))
    for f in flows.values():
        assert f["path"] == "tunnel" and f["encrypted"] and f["verdict"] == "forwarded", f
        flab.assert_end(f["src"], "pod1", r["sport"])
        flab.assert_end(f["dst"], "pod2", TUNNEL_PORT)
    close = flows["close"]
    assert close["bytes_exact"] and (close["bytes_sent"], close["bytes_received"]) == (r["sent"], r["received"]), close
    # The kernel reports no flow of its own for it (the tunnel is Envoy's to report).
    assert not [f for f in observe(flab.agent("node1").url, "--pod", "lab/pod1") if f["source"] == "kernel"
                and f["dst"]["port"] == TUNNEL_PORT]
    # node2's Envoy: the tunnel comes from node1's address; the source identity is pod1's certificate's and
    # the source pod (and its port) the one the CONNECT's `forwarded` names, pod1 having that identity; its
    # bytes are the CONNECT stream's, the application's plus the headers as Envoy counts them.
    inbound = by_event(flows_of(flab.agent("node2").url, lambda f: f["source"] == "envoy" and f["dst"]["port"] == TUNNEL_PORT,
                                2, "the inbound tunnel", "--pod", "lab/pod2", "--identity", sid("pod1"))[-2:])
    for f in inbound.values():
        assert f["path"] == "tunnel" and f["encrypted"] and f["verdict"] == "forwarded", f
        assert f["src"]["identity"] == sid("pod1"), f
        flab.assert_end(f["src"], "pod1", r["sport"])
        assert (f["http_method"], f["http_status"]) == ("CONNECT", 200), f
        flab.assert_end(f["dst"], "pod2", TUNNEL_PORT)
    close = inbound["close"]
    assert 0 < close["bytes_sent"] - r["sent"] < 1024 and 0 < close["bytes_received"] - r["received"] < 1024, close
    assert inbound["open"]["bytes_sent"] == inbound["open"]["bytes_received"] == 0, inbound["open"]


def test_l7_request_through_envoy(flab: FlowLab) -> None:
    r = flab.http("pod5", WEB_VIP, 80, 50_000)
    assert r["status"] == 200 and r["ok"] and r["body"] == HTTP_REPLY and r["via_envoy"], r
    url = flab.agent("node1").url
    # The request, from node1's Envoy: the backend it reached, method, path, status, bodies within its bytes.
    req = flows_of(url, from_port(r["sport"], "envoy"), 1, "the L7 request", "--service", "lab/web")[-1]
    assert req["path"] == "l7" and req["event"] == "close" and req["verdict"] == "forwarded", req
    assert (req["http_method"], req["http_path"], req["http_status"]) == ("POST", "/upload", 200), req
    assert (req["service"], req["route"], req["response_flags"]) == ("lab/web", "default", "-"), req
    flab.assert_end(req["src"], "pod5", r["sport"])
    flab.assert_end(req["dst"], "pod6", HTTP_PORT)
    # Envoy counts header bytes as it holds them (not as sent), so the bodies are what is exact.
    assert 50_000 < req["bytes_sent"] < 50_000 + 1024 and HTTP_REPLY < req["bytes_received"] < HTTP_REPLY + 1024, req
    # The connection into Envoy, from the kernel: the bytes on the wire, exactly.
    conn = by_event(flows_of(url, from_port(r["sport"]), 2, "the connection to Envoy's L7 listener",
                             "--service", "lab/web"))
    for f in conn.values():
        assert f["path"] == "l7" and f["service"] == "lab/web" and f["service_ip"] == WEB_VIP, f
        assert f["service_port"] == 80 and f["dst"]["ip"] == flab.lab.node("node1").ipv4, f
        flab.assert_end(f["src"], "pod5", r["sport"])
    # The pod and the node's Envoy are both on node1: that leg is spliced too, its bytes a flagged lower bound.
    close = conn["close"]
    assert close["bytes_exact"] is False and FIRST_SEND <= close["bytes_sent"] <= r["sent"], close
    assert 0 <= close["bytes_received"] <= r["received"], close


def test_denied_by_a_networkpolicy_names_the_rule(flab: FlowLab) -> None:
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "pod3-spliced-only", "namespace": NAMESPACE},
              "spec": {"podSelector": {"matchLabels": {"app": "pod3"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"ports": [{"port": SPLICED_PORT}, {"port": FLOOD_PORT}]}]}}
    path = flab.cluster.manifests / "flows-policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    try:
        answer: list[dict[str, Any]] = []

        def denied() -> bool:
            answer[:] = flab.send("pod5", flab.ip("pod3"), DENIED_PORT, 100)
            return answer[0].get("error") == "EACCES"
        waiting.wait_until(denied, 20, f"EACCES at connect() (last: {answer})")
        flows = flows_of(flab.agent("node1").url, lambda f: f["event"] == "refused" and f["dst"]["port"] == DENIED_PORT,
                         1, "the denied connection", "--verdict", "denied", "--pod", "lab/pod3")
        f = flows[-1]
        assert (f["verdict"], f["reason"]) == ("denied", "policy"), f
        assert f["policy"] == f"NetworkPolicy {NAMESPACE}/pod3-spliced-only default-deny", f
        assert f["source"] == "kernel" and f["service"] == "", f
        flab.assert_end(f["src"], "pod5")
        flab.assert_end(f["dst"], "pod3", DENIED_PORT)
    finally:
        path.unlink()
    waiting.wait_until(lambda: flab.send("pod5", flab.ip("pod3"), DENIED_PORT, 100)[0].get("ok") is True, 20,
                       "the policy gone")


def test_refused_for_a_clusterip_with_no_backend(flab: FlowLab) -> None:
    r = flab.send("pod5", NOBODY_VIP, 80, 100)[0]
    assert r == {"error": "ECONNREFUSED"}, r
    flows = flows_of(flab.agent("node1").url, lambda f: f["event"] == "refused", 1, "the refused connection",
                     "--service", "lab/nobody", "--verdict", "refused")
    f = flows[-1]
    assert (f["verdict"], f["reason"], f["policy"]) == ("refused", "no_backend", ""), f
    assert (f["service"], f["service_ip"], f["service_port"]) == ("lab/nobody", NOBODY_VIP, 80), f
    assert f["dst"]["ip"] == NOBODY_VIP and f["dst"]["port"] == 80 and f["dst"]["pod"] == "", f
    flab.assert_end(f["src"], "pod5")


def test_istio_metrics_carry_the_flows_numbers(flab: FlowLab) -> None:
    n1, n2 = flab.agent("node1").url, flab.agent("node2").url

    def pair(url: str, src: str, dst: str, service: str = "", source: str = "kernel") -> Callable[[], list[dict[str, Any]]]:
        return lambda: [f for f in observe(url, "--pod", f"lab/{src}") if f["source"] == source
                        and f["src"]["workload"] == src and f["dst"]["workload"] == dst and f["service"] == service
                        and f["path"] != "l7"]

    def labels(src: str, dst: str, service: str = "unknown", reporter: str = "source") -> dict[str, str]:
        return {"reporter": reporter, "source_workload": src, "destination_workload": dst,
                "destination_service": service, "source_principal": sid(src), "destination_principal": sid(dst)}

    metrics_match(n1, pair(n1, "pod5", "pod3", "lab/spliced"), **labels("pod5", "pod3", "spliced.lab.svc.cluster.local"),
                  connection_security_policy="none")
    metrics_match(n1, pair(n1, "pod5", "pod4"), **labels("pod5", "pod4"))
    metrics_match(n2, pair(n2, "pod5", "pod4"), **labels("pod5", "pod4", reporter="destination"))
    metrics_match(n1, pair(n1, "pod1", "pod2", source="envoy"), **labels("pod1", "pod2"),
                  connection_security_policy="mutual_tls")
    # The destination names the tunnel's source pod too (the CONNECT's `forwarded`, its identity checked).
    metrics_match(n2, pair(n2, "pod1", "pod2", source="envoy"), **labels("pod1", "pod2", reporter="destination"),
                  connection_security_policy="mutual_tls")
    denied = [f for f in observe(n1, "--verdict", "denied", "--pod", "lab/pod3") if f["reason"] == "policy"]
    assert denied and istio(n1, "istio_tcp_connections_opened_total", response_flags="DENY",
                            **labels("pod5", "pod3")) == len(denied)
    refused = observe(n1, "--service", "lab/nobody", "--verdict", "refused")
    assert refused and istio(n1, "istio_tcp_connections_closed_total", response_flags="UH",
                             destination_service="nobody.lab.svc.cluster.local") == len(refused)
    # L7: one request per request Envoy logged; the kernel's connection into Envoy is no request.
    requests = [f for f in observe(n1, "--service", "lab/web") if f["source"] == "envoy" and f["path"] == "l7"
                and f["http_status"] == 200]
    assert requests and istio(n1, "istio_requests_total", response_code="200",
                              **labels("pod5", "pod6", "web.lab.svc.cluster.local")) == len(requests)
    assert istio(n1, "istio_requests_total", response_code="0") == 0


def test_a_flood_overflowing_the_ring_buffer_is_counted_and_every_connection_works(flab: FlowLab) -> None:
    agent = flab.agent("node1")
    before = agent.status()["flows"]["kernel"]
    pid = agent.pid("agent")
    assert pid is not None
    # The reader stopped (the agent busy elsewhere): the flood must overflow the ring, not race the reader.
    os.kill(pid, signal.SIGSTOP)
    try:
        results = flab.send("pod5", flab.ip("pod3"), FLOOD_PORT, 200, FLOOD)
    finally:
        os.kill(pid, signal.SIGCONT)
    # The data path never waited for the events: every connection worked, every byte both ways checked.
    assert [r for r in results if not (r.get("ok") and r["sent"] == 200 and r["received"] == REPLY[FLOOD_PORT])] == []
    waiting.wait_until(lambda: len(flab.served(FLOOD_PORT)) == FLOOD, 20, "the server's records of the flood")
    assert set(flab.served(FLOOD_PORT)) == {"200 ok"}
    # Two events per connection (open, close): what the ring had no room for is counted, in /status and /metrics.
    after: dict[str, int] = {}

    def caught_up() -> bool:
        after.update(agent.status()["flows"]["kernel"])
        return after["read"] == after["emitted"]
    waiting.wait_until(caught_up, 20, "the agent read what the ring held")
    emitted, dropped = after["emitted"] - before["emitted"], after["dropped"] - before["dropped"]
    assert emitted + dropped == 2 * FLOOD and dropped >= 2 * FLOOD - RING_BYTES // 120, (emitted, dropped)
    assert istio(agent.url, "meshaccel_flow_events_total", result="dropped") == after["dropped"]
    # What was read is in the store; and the next connection is reported as ever.
    flood = observe(agent.url, "--port", str(FLOOD_PORT), "--pod", "lab/pod5")
    assert 0 < len(flood) <= emitted
    r = flab.send("pod5", flab.ip("pod3"), FLOOD_PORT, 200)[0]
    assert r.get("ok"), r
    assert by_event(flows_of(agent.url, from_port(r["sport"]), 2, "a connection after the flood",
                             "--port", str(FLOOD_PORT)))["close"]["path"] == "spliced"


def test_the_map_of_the_flows(flab: FlowLab, tmp_path: Path) -> None:
    url = flab.agent("node1").url
    svg = tmp_path / "map.svg"
    out = subprocess.run([sys.executable, "-m", "accel.cli", "observe", "--agent", url, "--map", str(svg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    drawn = svg_ids(svg)
    flows = [f for f in observe(url) if not (f["source"] == "kernel" and f["path"] == "l7")]
    nodes = {key(f[end]) for f in flows for end in ("src", "dst")}
    edges = {f"{key(f['src'])}->{key(f['dst'])}:{kind(f)}" for f in flows}
    assert drawn["node"] == nodes and drawn["edge"] == edges, (drawn, nodes, edges)
    # Each path of this lab is there, drawn as it went.
    assert {"lab/pod1->lab/pod2:encrypted", "lab/pod5->lab/pod4:plaintext", "lab/pod5->lab/pod3:plaintext",
            "lab/pod5->lab/pod6:plaintext", "lab/pod5->lab/pod3:denied", f"lab/pod5->{NOBODY_VIP}:denied"} <= edges


def key(ep: dict[str, Any]) -> str:
    return f"{ep['namespace']}/{ep['workload']}" if ep["workload"] else ep["ip"]


def kind(f: dict[str, Any]) -> str:
    return "denied" if f["verdict"] != "forwarded" else "encrypted" if f["encrypted"] else "plaintext"


def svg_ids(path: Path) -> dict[str, set[str]]:
    """The ids of the nodes and edges drawn in a map (an SVG: XML), by kind ("node", "edge")."""
    out: dict[str, set[str]] = {"node": set(), "edge": set()}
    for el in ET.parse(path).iter("{http://www.w3.org/2000/svg}g"):
        what, _, rest = el.get("id", "").partition(":")
        if what in out:
            out[what].add(rest)
    return out
