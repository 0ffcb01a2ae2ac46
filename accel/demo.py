"""`accel lab demo` (the README's first command): build a lab node, move bytes between two pods on
the plain kernel path and then spliced by the eBPF fast path, check every byte, show the numbers and
what is attached, draw the service map of the flows the agent saw, and remove everything."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from accel import flows_map
from accel.commands.observe import AgentStream
from accel.flows import Flow, flow_from_dict
from accel.lab import Lab
from accel.lab_agent import NAMESPACE, LabAgent
from accel.lab_measure import iperf3_throughput, pipe_pingpong, placements, sockperf_pingpong
from sockops_bpf.inspect import describe


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _checked_transfer(lab: Lab, megabytes: int, port: int) -> tuple[int, float]:
    """Client in pod2 -> server in pod1 and back, 8 connections; SHA-256 of both directions compared."""
    ip = lab.pod("pod1").ipv4
    per_msg = 1 << 20
    msgs = max(1, megabytes * 2**20 // (8 * 76_000))  # log-uniform sizes up to 1 MiB average ~76 kB
    common = ["--host", ip, "--port", str(port), "--conns", "8", "--msgs", str(msgs), "--max-size", str(per_msg)]
    server = lab.popen("pod1", [sys.executable, "-m", "accel.lab_traffic", "serve", *common],
                       stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    server.stdout.readline()
    t0 = time.monotonic()
    client = lab.run("pod2", [sys.executable, "-m", "accel.lab_traffic", "connect", *common],
                     capture_output=True, text=True, timeout=300)
    s_out, _ = server.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    c = {d["id"]: d for d in map(json.loads, client.stdout.splitlines())}
    s = {d["id"]: d for d in map(json.loads, s_out.splitlines()) if "id" in d}
    bad = [i for i in c if c[i]["sent_sha256"] != s.get(i, {}).get("recv_sha256")
           or s.get(i, {}).get("sent_sha256") != c[i]["recv_sha256"]]
    if client.returncode != 0 or bad or len(c) != 8:
        raise SystemExit(f"demo: byte check FAILED (connections {bad}); {client.stderr[-500:]}")
    return sum(d["sent_bytes"] + d["recv_bytes"] for d in c.values()), elapsed


DEMO_VIP = "10.96.0.10"
ASK = ("import socket, sys\n"
       "s = socket.create_connection((sys.argv[1], 80), timeout=5)\n"
       "print(s.recv(64).decode(), s.getpeername()[0])\n")
ECHO_NAME = ("import socket, sys\n"
             "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
             "s.bind((sys.argv[1], 8080)); s.listen(64)\n"
             "while True:\n"
             "    c, _ = s.accept(); c.sendall(sys.argv[2].encode()); c.close()\n")


def _service_demo(lab: Lab) -> list[Flow]:
    """The real agent follows a manifest folder; a ClusterIP is translated at connect(). Returns the flows
    the agent recorded."""
    _say(f"service load balancing: the agent follows a manifest folder; Service {DEMO_VIP}:80 -> pod2, pod3 :8080")
    servers = [lab.popen(n, [sys.executable, "-c", ECHO_NAME, lab.pod(n).ipv4, n]) for n in ("pod2", "pod3")]
    try:
        with LabAgent(lab) as agent:
            svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "demo", "namespace": NAMESPACE},
                   "spec": {"clusterIP": DEMO_VIP, "selector": {"app": "demo"},
                            "ports": [{"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
            eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "demo-1", "namespace": NAMESPACE,
                                "labels": {"kubernetes.io/service-name": "demo"}},
                   "addressType": "IPv4", "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}],
                   "endpoints": [{"addresses": [lab.pod(n).ipv4], "conditions": {"ready": True}}
                                 for n in ("pod2", "pod3")]}
            (agent.manifests / "demo-service.yaml").write_text(yaml.safe_dump_all([svc, eps]))
            print(f"    wrote {agent.manifests / 'demo-service.yaml'}")
            answers: Counter[str] = Counter()
            deadline = time.monotonic() + 30
            while sum(answers.values()) < 40 and time.monotonic() < deadline:
                out = lab.run("pod1", [sys.executable, "-c", ASK, DEMO_VIP], capture_output=True, text=True,
                              timeout=30).stdout.strip()
                if out:
                    answers[out] += 1
                else:
                    time.sleep(0.2)  # the agent has not programmed the service yet
            for answer, n in sorted(answers.items()):
                backend, peer = answer.split()
                print(f"    {n:3d} connections from pod1 to {DEMO_VIP}:80 answered by {backend}"
                      f" (the app's getpeername() says {peer})")
            return _flows_of(agent, sum(answers.values()))
    finally:
        for s in servers:
            s.kill()
            s.wait()


def _flows_of(agent: LabAgent, connections: int) -> list[Flow]:
    """What the agent recorded, once it has the closes of `connections` (each comes a moment after its close)."""
    deadline = time.monotonic() + 10
    while True:
        with AgentStream(agent.url, [("all", "1")], follow=False) as stream:
            flows = [flow_from_dict(doc) for _, doc in stream.docs()]
        if sum(f.event == "close" for f in flows) >= connections or time.monotonic() > deadline:
            return flows
        time.sleep(0.1)


def _draw_map(flows: list[Flow], path: Path) -> None:
    _say(f"the service map of the {len(flows)} flows the agent saw (as `accel observe --map` draws it)")
    m = flows_map.render(flows, path, title="meshaccel lab demo")
    for e in m.edges.values():
        print(f"    {e.src} -> {e.dst} ({e.kind}): {e.label().splitlines()[0]}")
    print(f"    wrote {path}")


def run(megabytes: int = 256, map_path: Path = Path("meshaccel-demo-map.svg")) -> int:
    one_cpu, two_cpus = placements()
    where = [one_cpu, *([two_cpus] if two_cpus else [])]
    _say("the machine's wakeup floor: two processes bounce a byte through pipes (no network stack), one-way")
    for cpus in where:
        floor = pipe_pingpong(cpus, 1.0)
        print(f"    {cpus.name.replace('_', ' ')}: p50 {floor['latency_p50_seconds'] * 1e6:.1f} us"
              + ("  (a wakeup on another CPU: what a ping-pong across CPUs mostly measures)"
                 if cpus is two_cpus else ""))
    _say("building a lab node: 3 pods (network namespaces + veth into a bridge, a cgroup each)")
    with Lab(3, attach=False) as lab:
        for p in lab.pods.values():
            print(f"    {p.name}: {p.ipv4}, {p.ipv6}  netns {p.netns}")
        results: dict[str, dict[str, float]] = {}
        for mode in ("plain", "accelerated"):
            if mode == "accelerated":
                _say("compiling and attaching the eBPF programs (sockops, sk_msg, service LB hooks) at the node cgroup")
                lab.attach_bpf()
            _say(f"{mode}: 8 connections exchange random-sized messages (1 B to 1 MiB) both ways at once;"
                 " SHA-256 of every byte sent and received is compared")
            moved, secs = _checked_transfer(lab, megabytes, 7000 + len(results) * 10)
            print(f"    {moved / 2**20:.0f} MiB moved and verified ({secs:.2f}s, Python hashing included)")
            _say(f"{mode}: 64-byte ping-pong latency (sockperf, one-way) with both ends on one CPU and on two,"
                 " and 1-stream throughput (iperf3)")
            m: dict[str, float] = {}
            for cpus in where:
                lat = sockperf_pingpong(lab, 2.0, 7100 + len(results) * 10 + len(m), cpus)
                m[f"latency_{cpus.name}"] = lat["latency_p50_seconds"]
                print(f"    {cpus.name.replace('_', ' ')}: latency p50 {lat['latency_p50_seconds'] * 1e6:.1f} us,"
                      f" p99 {lat['latency_p99_seconds'] * 1e6:.1f} us")
            m["throughput"] = iperf3_throughput(lab, 2.0, 1, 7200 + len(results) * 10, where[-1])
            results[mode] = m
            print(f"    throughput {m['throughput'] * 8 / 1e9:.2f} Gbit/s")
        flows = _service_demo(lab)
        _say("what is attached (accel status)")
        d = describe(lab.instance)
        for a in d["attachments"]:
            print(f"    {a['program']} on {a['hook']} -> {a.get('cgroup') or a.get('map')}")
        for name, m in d["maps"].items():
            print(f"    map {name}: {m.get('entries', '-')} entries")
        for k, v in d["counters"].items():
            print(f"    counter {k}: {v}")
        base, acc = results["plain"], results["accelerated"]
        latency = ", ".join(f"{c.name.replace('_', ' ')} x{acc[f'latency_{c.name}'] / base[f'latency_{c.name}']:.2f}"
                        for c in where)
        _say(f"result: latency p50 {latency}, "
             f"throughput x{acc['throughput'] / base['throughput']:.2f} (accelerated / plain); all bytes verified")
        _draw_map(flows, map_path)
        _say("removing the lab: namespaces, cgroups, attachments and pins")
    return 0
