"""Flows through the real agent: producers record, /flows serves recent and live flows, `accel
observe` (a real process) reads them as a table, as JSON lines and as a map; readers that vanish or
stall cost nothing; the agent's /metrics carries the Istio metrics and the flow pipeline's health."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from accel.agent import Agent, AgentConfig
from accel.flows import Flow, flow_from_dict
from accel.sources.manifests import ManifestSource
from tests.flow_helpers import CART, DB, FRONT, at, flow, outside
from tests.waiting import eventually

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent

MANIFESTS = """apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: front-0, namespace: shop, labels: {app: front}}
spec: {nodeName: n1, serviceAccountName: front}
status: {phase: Running, podIP: 10.1.0.10}
"""


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pods.yaml").write_text(MANIFESTS)
    a = Agent(AgentConfig(node="n1", state_dir=tmp_path / "state", listen=("127.0.0.1", 0), flows_kept=5000),
              ManifestSource(tmp_path / "m"), {})
    a.start()
    assert eventually(a.ready.is_set, 15, 0.02)
    try:
        yield a
    finally:
        a.stop()


def url(agent: Agent) -> str:
    return f"http://{agent.address}"


def observe(agent: Agent | str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    target = agent if isinstance(agent, str) else url(agent)
    return subprocess.run([sys.executable, "-m", "accel.cli", "observe", "--agent", target, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def sample_flows() -> list[Flow]:
    now = time.time()
    return [
        flow(dst=at(CART, 8080), service="shop/cart", service_port=80, bytes_sent=100, bytes_received=2000,
             duration_seconds=0.25, time=now - 120),
        flow(src=at(CART, 40100), dst=at(DB, 5432), event="refused", verdict="denied", reason="policy",
             policy="NetworkPolicy/data/db-ingress[0]", time=now - 60),
        flow(src=outside("192.0.2.9"), dst=at(FRONT, 8443), path="l7", source="envoy", http_method="GET",
             http_path="/api", http_status=200, route="front-api", bytes_sent=80, bytes_received=900, time=now),
    ]


def test_observe_prints_recent_flows_as_json_lines_and_as_a_table(agent: Agent) -> None:
    flows = sample_flows()
    agent.flows.record_many(flows)
    r = observe(agent, "--output", "json")
    assert r.returncode == 0, r.stderr
    got = [flow_from_dict(json.loads(line)) for line in r.stdout.splitlines()]
    assert got == flows
    r = observe(agent, "--verdict", "denied", "--output", "json")
    assert [flow_from_dict(json.loads(line)) for line in r.stdout.splitlines()] == [flows[1]]
    r = observe(agent, "--namespace", "data")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2 and lines[0].split()[:3] == ["TIME", "SOURCE", "DESTINATION"]
    assert "shop/cart-0:40100" in lines[1] and "data/db-0:5432" in lines[1] and "DENIED" in lines[1]
    assert "reason policy (NetworkPolicy/data/db-ingress[0])" in lines[1]
    r = observe(agent, "--port", "8443")
    assert "GET /api -> 200; route front-api" in r.stdout and "l7" in r.stdout
    r = observe(agent, "--last", "1", "--output", "json")
    assert [flow_from_dict(json.loads(line)) for line in r.stdout.splitlines()] == flows[-1:]


def test_filters_that_match_nothing_print_nothing_and_exit_0(agent: Agent) -> None:
    r = observe(agent)
    assert (r.returncode, r.stdout) == (0, "") and "the agent has recorded no flows yet" in r.stderr
    agent.flows.record_many(sample_flows())
    r = observe(agent, "--namespace", "nowhere", "--output", "json")
    assert (r.returncode, r.stdout) == (0, "")
    assert r.stderr.strip() == ("accel observe: no flows match these filters (the agent keeps 3 flow(s); "
                                "try fewer filters or an earlier --since)")


@pytest.mark.parametrize(("args", "says"), [
    (["--verdict", "maybe"], "accel: error: --verdict 'maybe' is not one of forwarded, denied, refused"),
    (["--port", "0"], "accel: error: --port '0' is not a port number (1-65535)"),
    (["--since", "a while"], "accel: error: --since 'a while' is not a duration"),
    (["--map", "x.gif"], "accel: error: --map x.gif: name the file .svg or .png"),
    (["--map", "x.svg", "--follow"], "accel: error: --map draws the recent flows; it cannot --follow"),
])
def test_bad_filter_values_are_one_line_errors(agent: Agent, args: list[str], says: str) -> None:
    r = observe(agent, *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(says) and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_agent_refuses_a_bad_filter_with_400_and_one_line(agent: Agent) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url(agent) + "/flows?verdict=maybe", timeout=5)
    assert e.value.code == 400
    assert e.value.read().decode() == "--verdict 'maybe' is not one of forwarded, denied, refused\n"


def test_unreachable_agent_is_a_one_line_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        r = observe(f"http://127.0.0.1:{port}")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"accel: error: no agent answers at http://127.0.0.1:{port} (")
    assert r.stderr.rstrip().endswith("start one with `accel agent` or pass --agent URL")
    assert len(r.stderr.strip().splitlines()) == 1
    r = observe("ftp://example")
    assert r.returncode == 2 and "is not an http://HOST:PORT URL" in r.stderr


def test_follow_streams_new_flows_as_they_come(agent: Agent) -> None:
    agent.flows.record_many(sample_flows())  # before: not shown without --last
    proc = subprocess.Popen([sys.executable, "-m", "accel.cli", "observe", "--agent", url(agent), "--follow",
                             "--namespace", "data", "--output", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert eventually(lambda: agent.flows.streams.open_streams == 1, 15, 0.02)
        live = [flow(src=at(CART, 41000 + i), dst=at(DB, 5432), bytes_sent=i) for i in range(5)]
        for f in live:
            agent.flows.record(f)
            agent.flows.record(flow())  # not matching
        assert proc.stdout is not None
        got = [flow_from_dict(json.loads(proc.stdout.readline())) for _ in live]
        assert got == live
    finally:
        proc.terminate()  # like ctrl-C ending a follow
        proc.wait(10)
    assert eventually(lambda: agent.flows.streams.open_streams == 0, 5, 0.05)
    assert agent.flows.store.stats()["subscribers"] == 0


def test_client_that_disconnects_mid_stream_is_cleaned_up(agent: Agent) -> None:
    port = int(agent.address.rsplit(":", 1)[1])
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /flows?follow=1 HTTP/1.0\r\n\r\n")
        reader = s.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.0 200")
        while reader.readline() not in (b"\r\n", b""):
            pass  # headers
        agent.flows.record(flow(bytes_sent=7))
        assert json.loads(reader.readline())["bytes_sent"] == 7
        assert agent.flows.streams.open_streams == 1
        reader.close()
        s.close()  # gone mid-stream, and no more flows come to notice it by
        assert eventually(lambda: agent.flows.streams.open_streams == 0, 5, 0.02)
        assert agent.flows.store.stats()["subscribers"] == 0
    agent.flows.record(flow())
    assert agent.healthy()


def test_every_flow_is_delivered_or_counted_lost(agent: Agent) -> None:
    agent.flows.store.queue_size = 10
    port = int(agent.address.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /flows?follow=1 HTTP/1.0\r\n\r\n")
        reader = s.makefile("rb")
        while reader.readline() not in (b"\r\n", b""):
            pass  # status and headers
        assert eventually(lambda: agent.flows.streams.open_streams == 1, 5, 0.02)
        agent.flows.record_many([flow(bytes_sent=i) for i in range(1000)])  # a burst: far more than 10
        delivered, lost = [], 0
        while len(delivered) + lost < 1000:
            doc = json.loads(reader.readline())
            if "lost_events" in doc:
                lost += doc["lost_events"]
            else:
                delivered.append(doc["bytes_sent"])
        assert lost > 0 and len(delivered) + lost == 1000
        assert delivered == sorted(delivered)  # what arrives comes in order
        reader.close()


def test_stalled_reader_loses_flows_not_the_producer(agent: Agent) -> None:
    agent.flows.streams.write_timeout = 1.0
    agent.flows.store.queue_size = 200
    port = int(agent.address.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /flows?follow=1 HTTP/1.0\r\n\r\n")  # then never reads
    assert eventually(lambda: agent.flows.streams.open_streams == 1, 5, 0.02)
    for _ in range(20):  # returns although nobody reads (were it to wait, the test would hang)
        agent.flows.record_many([flow() for _ in range(1000)])
    assert len(agent.flows.store) == 5000  # the store keeps the last flows_kept
    assert eventually(lambda: agent.flows.store.stats()["subscriber_drops"] > 0
                      or agent.flows.streams.open_streams == 0, 10, 0.05)
    # The blocked writer gives up after write_timeout and the stream is dropped.
    assert eventually(lambda: agent.flows.streams.open_streams == 0, 10, 0.05)
    assert agent.flows.store.stats()["subscriber_drops"] > 0
    s.close()


def test_streams_end_when_the_agent_stops(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    a = Agent(AgentConfig(node="n1", listen=("127.0.0.1", 0)), ManifestSource(tmp_path / "m"), {}).start()
    conn = http.client.HTTPConnection("127.0.0.1", int(a.address.rsplit(":", 1)[1]), timeout=10)
    conn.request("GET", "/flows?follow=1")
    resp = conn.getresponse()
    done = threading.Event()
    threading.Thread(target=lambda: (resp.read(), done.set()), daemon=True).start()
    a.stop()
    assert done.wait(5)  # the stream ended (EOF), it did not hang the stop
    conn.close()


def test_agent_metrics_and_status_carry_flows(agent: Agent) -> None:
    agent.flows.record_many(sample_flows())
    with urllib.request.urlopen(url(agent) + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "meshaccel_flows_kept 3.0" in text and "meshaccel_flows_total 3.0" in text
    assert 'istio_requests_total{' in text and 'response_code="200"' in text and 'reporter="destination"' in text
    assert "istio_tcp_connections_closed_total{" in text
    assert "meshaccel_state_objects" in text  # the agent's own registry is still there
    with urllib.request.urlopen(url(agent) + "/status", timeout=5) as r:
        st = json.loads(r.read())
    assert st["flows"]["kept"] == 3 and st["flows"]["capacity"] == 5000 and st["flows"]["access_log"] is None
    # The model resolved front-0's address: a flow from it is reported by the source end only.
    assert agent.flows.resolver.is_local(FRONT) and not agent.flows.resolver.is_local(CART)


def test_observe_map_draws_the_recent_flows(agent: Agent, tmp_path: Path) -> None:
    agent.flows.record_many(sample_flows())
    out = tmp_path / "mesh.svg"
    r = observe(agent, "--map", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {out}: 4 node(s), 3 edge(s) from 3 flow(s)"
    ids = {g.get("id") for g in ET.parse(out).getroot().iter("{http://www.w3.org/2000/svg}g")}
    assert {"edge:shop/front->shop/cart:plaintext", "edge:shop/cart->data/db:denied",
            "edge:192.0.2.9->shop/front:plaintext"} <= ids
    png = tmp_path / "mesh.png"
    r = observe(agent, "--map", str(png), "--namespace", "data")
    assert r.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert "1 edge(s) from 1 flow(s)" in r.stdout


def test_observe_output_into_a_closed_pipe_is_quiet(agent: Agent) -> None:
    agent.flows.record_many([flow() for _ in range(3000)])
    p = subprocess.run(f"{sys.executable} -m accel.cli observe --agent {url(agent)} --all | head -1",
                       shell=True, capture_output=True, text=True, cwd=ROOT, timeout=30,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.startswith("TIME") and p.stderr == ""


def test_agent_runs_the_access_log_server_it_is_given(tmp_path: Path) -> None:
    import grpc
    from envoy.data.accesslog.v3 import accesslog_pb2 as al
    from envoy.service.accesslog.v3 import als_pb2

    from meshxds.als import SERVICE

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pods.yaml").write_text(MANIFESTS)
    sock = tmp_path / "als.sock"
    a = Agent(AgentConfig(node="n1", listen=("127.0.0.1", 0), als_listen=f"unix:{sock}"),
              ManifestSource(tmp_path / "m"), {}).start()
    try:
        assert eventually(a.ready.is_set, 15, 0.02)
        assert a.status()["flows"]["access_log"]["address"] == f"unix:{sock}"
        entry = al.HTTPAccessLogEntry()
        c = entry.common_properties
        c.downstream_remote_address.socket_address.address = "10.1.0.10"  # front-0, from the manifests
        c.downstream_remote_address.socket_address.port_value = 43210
        c.upstream_remote_address.socket_address.address = "10.1.0.11"
        c.upstream_remote_address.socket_address.port_value = 8080
        c.route_name = "r1"
        entry.request.request_method = 1  # GET
        entry.request.path = "/x"
        entry.response.response_code.value = 201
        msg = als_pb2.StreamAccessLogsMessage()
        msg.http_logs.log_entry.append(entry)
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            ch.stream_unary(f"/{SERVICE}/StreamAccessLogs", request_serializer=None,
                            response_deserializer=als_pb2.StreamAccessLogsResponse.FromString)(
                iter([msg.SerializeToString()]), timeout=10)
        r = observe(url(a), "--output", "json")
        [f] = [flow_from_dict(json.loads(line)) for line in r.stdout.splitlines()]
        assert (f.source, f.path, f.http_status, f.route, f.src.pod, f.src.workload) == \
            ("envoy", "l7", 201, "r1", "shop/front-0", "front")
        assert a.healthy()
    finally:
        a.stop()
    assert not a.flows.als.alive()  # type: ignore[union-attr]


@pytest.mark.parametrize(("als", "says"), [
    ("nonsense", "accel: error: --als-listen 'nonsense' is not HOST:PORT or unix:PATH"),
    ("unix:/nonexistent/dir/als.sock", "accel: error: --als-listen unix:/nonexistent/dir/als.sock: access log server "
                                       "could not start"),
])
def test_bad_als_listen_is_a_one_line_error(tmp_path: Path, als: str, says: str) -> None:
    (tmp_path / "m").mkdir()
    r = subprocess.run([sys.executable, "-m", "accel.cli", "agent", "--node", "n1", "--source", f"manifests:{tmp_path / 'm'}",
                        "--maps", "memory", "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0",
                        "--als-listen", als], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("accel: error:")]
    assert len(errors) == 1 and errors[0].startswith(says), r.stderr
