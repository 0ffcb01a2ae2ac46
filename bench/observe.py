"""observe: what flows cost: the agent's memory with 100,000 flows kept and the flows per second its
store and access log server ingest (the agent part); the fast path with flow events off and on (the
kernel part). `--part agent|kernel` runs one of them.

Baseline and candidate, measured in the same run (each memory and ALS measurement in a fresh
process, so one does not inherit the other's heap):
- agent_rss_bytes: baseline = the agent (memory maps, a 200-pod model, HTTP endpoint) started and
  synced, no flow recorded; candidate = the same agent after 150,000 flows recorded, 100,000 kept.
- store_ingest_flows_per_second: baseline = the bounded store alone (`FlowStore.extend`, batches of
  100); candidate = the agent's pipeline (`AgentFlows.record_many`: store + Istio metrics + one live
  `/flows?follow=1` reader over HTTP).
- als_ingest_flows_per_second: baseline = protobuf parsing of the same access log messages only (the
  floor any decoder pays); candidate = the agent's ALS server on a unix socket, fed by a gRPC client in
  another process (messages of 100 HTTP entries, as Envoy batches them), to flows in the store.
- the kernel part, on two lab nodes of two pods each: the same programs compiled with flow events off
  (FLOW_EVENTS=0: the baseline) and on (the default: the candidate), each node with its real agent
  (`accel agent`), so the candidate's agent reads the ring buffer as in production.
  fastpath_throughput_bytes_per_second (iperf3, 1 stream) and fastpath_latency_p50_seconds (sockperf
  ping-pong, 64 B) between two pods on the spliced path: a connection's events are its open and close,
  so these show what reporting costs a connection's bytes (the issue's target: <= 3 % and <= 5 %).
  short_connections_per_second (connect, 1 byte each way, close, from Python): where the events are; on
  2 CPUs it is CPU-bound, so the agent's reading competes with the client and server for the CPUs
  (agent_cpu_seconds_per_flow_event says how much). The nodes swap roles every round (programs swapped
  in place) and take turns to go first, so neither a node nor drift on this shared machine favours one
  side; medians, and the median of each round's on/off pair.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.common import median, process_cpu_seconds, report

ROOT = Path(__file__).resolve().parent.parent
KEPT = 100_000
RECORDED = 150_000
WORKLOADS, PODS_PER, NAMESPACES = 40, 5, 5


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --- a cluster and its flows ---------------------------------------------------------------------

def _ip(i: int) -> str:
    return f"10.8.{i // 250}.{i % 250 + 1}"


def model_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [{"kind": "Namespace", "metadata": {"name": f"ns{n}"}} for n in range(NAMESPACES)]
    for w in range(WORKLOADS):
        for p in range(PODS_PER):
            i = w * PODS_PER + p
            docs.append({"kind": "Pod", "metadata": {
                "name": f"wl{w}-5d8f7-{p:05d}", "namespace": f"ns{w % NAMESPACES}",
                "labels": {"app": f"wl{w}", "version": "v1", "pod-template-hash": "5d8f7"}},
                "spec": {"nodeName": "node-0" if i % 2 == 0 else "node-1", "serviceAccountName": f"wl{w}"},
                "status": {"phase": "Running", "podIP": _ip(i), "conditions": [{"type": "Ready", "status": "True"}]}})
    return docs


def write_manifests(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cluster.yaml").write_text(yaml.safe_dump_all([{"apiVersion": "v1", **d} for d in model_docs()]))


def make_flows(resolve: Callable[[str, int], Any], n: int) -> list[Any]:
    """Flows as producers make them: endpoints from the resolver, a fresh source port each, a mix of
    spliced/TCP connections (open and close), tunnels and L7 requests."""
    from accel.flows import Flow

    pods = WORKLOADS * PODS_PER
    now = time.time()
    out = []
    for k in range(n):
        src = resolve(_ip(k % pods), 32768 + k % 28000)
        dst = resolve(_ip((k * 7 + 3) % pods), 8080)
        kind = k % 10
        if kind < 4:
            f = Flow(now, "open" if kind % 2 == 0 else "close", "kernel", "TCP", src, dst, "spliced", False,
                     "forwarded", cookie=10**12 + k, bytes_sent=1000 + k, bytes_received=50_000 + k,
                     bytes_exact=False, duration_seconds=0.01 * kind, service="ns1/wl1", service_port=80)
        elif kind < 7:
            f = Flow(now, "close", "kernel", "TCP", src, dst, "tcp", False, "forwarded", cookie=10**12 + k,
                     bytes_sent=2000 + k, bytes_received=9000 + k, duration_seconds=0.5)
        elif kind < 9:
            f = Flow(now, "close", "envoy", "TCP", src, dst, "l7", False, "forwarded", service="ns2/wl2",
                     bytes_sent=300, bytes_received=1200 + k % 500, duration_seconds=0.002, http_method="GET",
                     http_path=f"/api/items/{k % 100}", http_status=200, route="default", response_flags="-")
        else:
            f = Flow(now, "close", "envoy", "TCP", src, dst, "tunnel", True, "forwarded",
                     bytes_sent=4000, bytes_received=16000, duration_seconds=1.0, response_flags="-")
        out.append(f)
    return out


# --- memory --------------------------------------------------------------------------------------

def worker_memory() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="meshaccel-bench-observe-") as tmp:
        agent = start_agent(Path(tmp))
        try:
            urllib.request.urlopen(f"http://{agent.address}/metrics", timeout=10).read()  # warm the paths used
            gc.collect()
            base = rss_bytes()
            for _ in range(RECORDED // 10_000):
                agent.flows.record_many(make_flows(agent.flows.resolver.endpoint, 10_000))
            urllib.request.urlopen(f"http://{agent.address}/metrics", timeout=10).read()
            gc.collect()
            cand = rss_bytes()
            kept = len(agent.flows.store)
            series = agent.flows.istio.series()
        finally:
            agent.stop()
    return {"baseline_rss": float(base), "candidate_rss": float(cand), "kept": float(kept),
            "istio_series": float(series)}


# --- store ingest --------------------------------------------------------------------------------

def start_agent(folder: Path) -> Any:
    from accel.agent import Agent, AgentConfig
    from accel.sources.manifests import ManifestSource

    write_manifests(folder / "m")
    agent = Agent(AgentConfig(node="node-0", state_dir=folder / "state", listen=("127.0.0.1", 0), flows_kept=KEPT),
                  ManifestSource(folder / "m"), {}).start()
    if not agent.ready.wait(60) or len(agent.state.workloads()) != WORKLOADS * PODS_PER:
        agent.stop()
        raise RuntimeError("the agent did not sync the benchmark's pods")
    return agent


def _drain(resp: Any) -> None:
    for _line in resp:
        pass


def worker_store(n: int, rounds: int) -> dict[str, float]:
    import http.client

    from accel.flows import FlowStore

    base, cand, drops = [], [], 0.0
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="meshaccel-bench-store-") as tmp:
            agent = start_agent(Path(tmp))
            try:
                batches = [make_flows(agent.flows.resolver.endpoint, 100) for _ in range(n // 100)]
                store = FlowStore(KEPT)
                t0 = time.perf_counter()
                for b in batches:
                    store.extend(b)
                base.append(n / (time.perf_counter() - t0))
                del store
                # The agent's pipeline, with one live reader streaming everything over HTTP.
                host, port = agent.address.rsplit(":", 1)
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                conn.request("GET", "/flows?follow=1")
                resp = conn.getresponse()
                reader = threading.Thread(target=_drain, args=(resp,), daemon=True)
                reader.start()
                while agent.flows.streams.open_streams == 0:
                    time.sleep(0.01)
                t0 = time.perf_counter()
                for b in batches:
                    agent.flows.record_many(b)
                cand.append(n / (time.perf_counter() - t0))
                drops += agent.flows.store.stats()["subscriber_drops"]
            finally:
                agent.stop()
            reader.join(10)
            conn.close()
        print(f"observe: store round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return {"baseline": median(base), "candidate": median(cand), "reader_drops": drops / rounds}


# --- ALS ingest ----------------------------------------------------------------------------------

def als_messages(n_messages: int, per: int = 100) -> list[bytes]:
    from envoy.data.accesslog.v3 import accesslog_pb2 as al
    from envoy.service.accesslog.v3 import als_pb2

    pods = WORKLOADS * PODS_PER
    out = []
    k = 0
    for m in range(n_messages):
        msg = als_pb2.StreamAccessLogsMessage()
        if m == 0:
            msg.identifier.node.id = "node-0"
            msg.identifier.log_name = "meshaccel"
        for _ in range(per):
            e = msg.http_logs.log_entry.add()
            c = e.common_properties
            c.downstream_remote_address.socket_address.address = _ip(k % pods)
            c.downstream_remote_address.socket_address.port_value = 32768 + k % 28000
            c.upstream_remote_address.socket_address.address = _ip((k * 7 + 3) % pods)
            c.upstream_remote_address.socket_address.port_value = 8080
            c.start_time.FromNanoseconds(time.time_ns())
            c.duration.FromNanoseconds(2_000_000)
            c.route_name = "default"
            c.upstream_cluster = "svc|ns2|wl2|80"
            c.access_log_type = al.DownstreamEnd
            c.custom_tags["meshaccel.path"] = "l7"
            c.custom_tags["meshaccel.service"] = "ns2/wl2"
            e.request.request_method = 1
            e.request.path = f"/api/items/{k % 100}"
            e.request.request_headers_bytes = 120
            e.response.response_code.value = 200
            e.response.response_headers_bytes = 90
            e.response.response_body_bytes = 1200
            k += 1
        out.append(msg.SerializeToString())
    return out


def worker_als_client(address: str, n_messages: int) -> None:
    import grpc
    from envoy.service.accesslog.v3 import als_pb2

    from meshxds.als import SERVICE

    msgs = als_messages(n_messages)
    with grpc.insecure_channel(address) as ch:
        ch.stream_unary(f"/{SERVICE}/StreamAccessLogs", request_serializer=None,
                        response_deserializer=als_pb2.StreamAccessLogsResponse.FromString)(iter(msgs), timeout=600)


def worker_als(n_messages: int) -> dict[str, float]:
    from envoy.service.accesslog.v3 import als_pb2

    from accel.agent_flows import AgentFlows
    from accel.state.model import Event, EventType
    from accel.state.parse import parse_object
    from accel.state.store import ClusterState

    msgs = als_messages(n_messages)
    n = n_messages * 100
    t0 = time.perf_counter()
    for raw in msgs:
        als_pb2.StreamAccessLogsMessage().ParseFromString(raw)
    parse_rate = n / (time.perf_counter() - t0)
    del msgs
    state = ClusterState()
    state.apply([Event(EventType.ADDED, parse_object({"apiVersion": "v1", **d})) for d in model_docs()], synced=True)
    with tempfile.TemporaryDirectory(prefix="meshaccel-bench-als-") as tmp:
        sock = f"unix:{tmp}/als.sock"
        flows = AgentFlows("node-0", state, KEPT, als_listen=sock)
        flows.start()
        try:
            client = subprocess.Popen([sys.executable, "-m", "bench", "observe", "--worker", "als-client",
                                       "--address", sock, "--messages", str(n_messages)], cwd=ROOT)
            while flows.store.appended == 0 and client.poll() is None:
                time.sleep(0.0005)
            t_first, first = time.perf_counter(), flows.store.appended
            while flows.store.appended < n and client.poll() is None:
                time.sleep(0.001)
            while flows.store.appended < n and time.perf_counter() - t_first < 120:
                time.sleep(0.001)
            elapsed = time.perf_counter() - t_first
            got = flows.store.appended
            client.wait(60)
        finally:
            flows.stop()
    return {"baseline": parse_rate, "candidate": (got - first) / elapsed if elapsed > 0 else 0.0,
            "flows": float(got), "malformed": float(flows.envoy.status()["malformed_entries"])}


# --- the run -------------------------------------------------------------------------------------

def _run_worker(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "bench", "observe", "--worker", *args], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ))
    if out.returncode != 0:
        raise RuntimeError(f"bench observe worker {args[0]} failed:\n{out.stderr[-2000:]}")
    doc: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


def agent_part(a: argparse.Namespace) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    mem = _run_worker("memory")
    store = _run_worker("store", "--flows", str(a.flows), "--rounds", str(a.rounds))
    als_runs = [_run_worker("als", "--messages", str(a.als_messages)) for _ in range(a.rounds)]
    baseline = {"agent_rss_bytes": mem["baseline_rss"],
                "store_ingest_flows_per_second": store["baseline"],
                "als_ingest_flows_per_second": median([r["baseline"] for r in als_runs])}
    candidate = {"agent_rss_bytes": mem["candidate_rss"],
                 "store_ingest_flows_per_second": store["candidate"],
                 "als_ingest_flows_per_second": median([r["candidate"] for r in als_runs])}
    extra = {"flows_kept": int(mem["kept"]), "flows_recorded": RECORDED,
             "rss_per_kept_flow_bytes": round((mem["candidate_rss"] - mem["baseline_rss"]) / max(1.0, mem["kept"])),
             "istio_series": int(mem["istio_series"]), "live_reader_drops_per_round": store["reader_drops"],
             "als_flows_per_run": int(als_runs[0]["flows"])}
    return baseline, candidate, extra


# --- the kernel: flow events off and on --------------------------------------------------------------

@contextlib.contextmanager
def _one_cpu() -> Iterator[None]:
    """The processes started meanwhile (they inherit this process' affinity) share the last CPU. Where the
    two ends of a spliced ping-pong run decides its latency (a wakeup on another CPU costs ~20 us: on this
    machine 4 us against 25 us p50, either way at random); one CPU for both is steady for both variants."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def _kernel_round(lab: Any, seconds: float, connections: int, port: int) -> dict[str, float]:
    from accel.lab_measure import iperf3_throughput, short_connections, sockperf_pingpong

    # iperf3 is not pinned: a receiver sharing its sender's CPU falls behind, and a spliced socket's receive
    # queue has no limit (sockmap's ingress redirect does no rmem accounting; measured: 1.8 GB queued, the
    # host's TCP memory in pressure, then ENOMEM to the sender). Free, that is rare; such a run is redone.
    for attempt in range(3):
        try:
            throughput = iperf3_throughput(lab, seconds, 1, port + 3 + attempt)
            break
        except (KeyError, ValueError):  # no result: iperf3 failed (ENOMEM), or its client came too early
            if attempt == 2:
                raise
    with _one_cpu():
        p50 = sockperf_pingpong(lab, seconds, port + 1)["latency_p50_seconds"]
    # Many connections, placed wherever the scheduler puts them, with the agent reading their events beside.
    rate = short_connections(lab, connections, port + 2)
    return {"fastpath_throughput_bytes_per_second": throughput, "fastpath_latency_p50_seconds": p50,
            "short_connections_per_second": rate}


def _emitted(agent: Any) -> int:
    return int(agent.status()["flows"]["kernel"]["emitted"])


def kernel_part(a: argparse.Namespace) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    from accel.lab import Lab
    from accel.lab_agent import LabAgent
    from sockops_bpf import loader

    labs = [Lab(2, attach=False), Lab(2, attach=False)]
    agents: list[LabAgent] = []
    defines = {"off": {"FLOW_EVENTS": "0"}, "on": {}}
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    events = 0
    agent_cpu = 0.0  # the candidate's agent, during its rounds: reading and recording the events
    try:
        for lab in labs:
            lab.up()
            lab.attach_bpf(defines["off"])
            agents.append(LabAgent(lab).up())  # finds the pods' namespaces: the events name the pods
        for r in range(a.kernel_rounds):
            # The two nodes swap roles every round (programs swapped in place, maps kept) and the first to run
            # alternates every other round: neither a node nor a moment of this shared machine favours one side.
            role = {"on": r % 2, "off": 1 - r % 2}
            for name, i in role.items():
                loader.load(labs[i].instance, labs[i].cgroup, defines[name])
            for name in (("off", "on") if (r // 2) % 2 == 0 else ("on", "off")):
                i = role[name]
                pid = agents[i].pid("agent")
                assert pid is not None
                before, cpu = _emitted(agents[i]), process_cpu_seconds(pid)
                runs[name].append(_kernel_round(labs[i], a.seconds, a.connections, 21000 + r * 20 + i * 10))
                emitted = _emitted(agents[i]) - before
                if (emitted > 0) != (name == "on"):
                    raise RuntimeError(f"flow events were not {name} as compiled ({emitted} emitted in the round)")
                if name == "on":
                    events += emitted
                    agent_cpu += process_cpu_seconds(pid) - cpu
            print(f"observe: kernel round {r + 1}/{a.kernel_rounds}: " + "; ".join(
                f"{name} {m['fastpath_throughput_bytes_per_second'] * 8 / 1e9:.2f} Gbit/s, "
                f"p50 {m['fastpath_latency_p50_seconds'] * 1e6:.1f} us, {m['short_connections_per_second']:.0f} conn/s"
                for name, m in (("off", runs["off"][-1]), ("on", runs["on"][-1]))), file=sys.stderr, flush=True)
        kernel = [agent.status()["flows"]["kernel"] for agent in agents]
    finally:
        for agent in agents:
            agent.down()
        for lab in labs:
            lab.down()
    keys = runs["off"][0].keys()
    baseline = {k: median([m[k] for m in runs["off"]]) for k in keys}
    candidate = {k: median([m[k] for m in runs["on"]]) for k in keys}
    extra = {"kernel_rounds": a.kernel_rounds, "kernel_seconds_per_test": a.seconds,
             "short_connections_per_round": a.connections,
             # each round's on/off, the median over rounds: what drift does to both cancels out of each pair
             "paired_ratio_median": {k: round(median([on[k] / off[k] for on, off in zip(runs["on"], runs["off"],
                                                                                         strict=True)]), 4)
                                     for k in keys},
             "flow_events_emitted": events,
             "agent_cpu_seconds_per_flow_event": agent_cpu / events if events else 0.0,
             "flow_events_read_by_the_agents": sum(k["read"] for k in kernel),
             "flow_events_dropped": sum(k["dropped"] for k in kernel),
             "flow_events_cost": {
                 "throughput_loss": round(1 - candidate["fastpath_throughput_bytes_per_second"]
                                          / baseline["fastpath_throughput_bytes_per_second"], 4),
                 "latency_p50_increase": round(candidate["fastpath_latency_p50_seconds"]
                                               / baseline["fastpath_latency_p50_seconds"] - 1, 4),
                 "short_connection_rate_loss": round(1 - candidate["short_connections_per_second"]
                                                     / baseline["short_connections_per_second"], 4),
                 "targets": "throughput_loss <= 0.03, latency_p50_increase <= 0.05"}}
    return baseline, candidate, extra


# Each part returns (baseline, candidate, extra).
PARTS: dict[str, Callable[[argparse.Namespace], tuple[dict[str, float], dict[str, float], dict[str, Any]]]] = {
    "agent": agent_part, "kernel": kernel_part}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench observe", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--flows", type=int, default=200_000, help="flows per store-ingest round")
    ap.add_argument("--als-messages", type=int, default=1000, help="access log messages (100 entries each) per run")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions of the rate measurements (medians reported)")
    ap.add_argument("--part", action="append", choices=sorted(PARTS),
                    help="measure only this part (repeat for several; default: all)")
    ap.add_argument("--kernel-rounds", type=int, default=6, help="kernel part: rounds (the nodes swap roles each)")
    ap.add_argument("--seconds", type=float, default=4.0, help="kernel part: seconds per iperf3 / sockperf run")
    ap.add_argument("--connections", type=int, default=3000, help="kernel part: short connections per round")
    ap.add_argument("--worker", choices=("memory", "store", "als", "als-client"), help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--messages", type=int, default=1000, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker == "memory":
        print(json.dumps(worker_memory()))
        return 0
    if a.worker == "store":
        print(json.dumps(worker_store(a.flows, a.rounds)))
        return 0
    if a.worker == "als":
        print(json.dumps(worker_als(a.messages)))
        return 0
    if a.worker == "als-client":
        worker_als_client(a.address, a.messages)
        return 0
    baseline: dict[str, float] = {}
    candidate: dict[str, float] = {}
    extra: dict[str, Any] = {}
    for name in a.part or list(PARTS):
        if not a.json:
            print(f"observe: {name} part ...", file=sys.stderr, flush=True)
        b, c, e = PARTS[name](a)
        baseline.update(b)
        candidate.update(c)
        extra.update(e)
    ratio = {k: candidate[k] / baseline[k] for k in baseline if baseline.get(k) and k in candidate}
    extra["notes"] = ("ratio = candidate / baseline. agent_rss_bytes: no flows vs 100,000 kept; "
                      "store_ingest: bare store vs agent pipeline (store + Istio metrics + a live /flows reader); "
                      "als_ingest: protobuf parsing only vs the agent's ALS server to flows; fastpath_*, "
                      "short_connections: flow events compiled out vs on with the agent reading them")
    report("observe", baseline, candidate, ratio, a.json, extra=extra)
    return 0
