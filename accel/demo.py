"""`accel lab demo` (the README's first command): build a lab node, move bytes between two pods on
the plain kernel path and then spliced by the eBPF fast path, check every byte, show the numbers and
what is attached, and remove everything."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from accel.lab import Lab
from bench.fastpath import iperf3_throughput, sockperf_pingpong
from sockops_bpf.inspect import describe


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _checked_transfer(lab: Lab, megabytes: int, port: int) -> tuple[int, float]:
    """Client in pod2 -> server in pod1 and back, 8 connections; SHA-256 of both directions compared."""
    ip = lab.pod("pod1").ipv4
    per_msg = 1 << 20
    msgs = max(1, megabytes // 8 // 8)  # log-uniform sizes average about 1/8 MiB
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


def run(megabytes: int = 256) -> int:
    _say("building a lab node: 2 pods (network namespaces + veth into a bridge, a cgroup each)")
    with Lab(2, attach=False) as lab:
        for p in lab.pods.values():
            print(f"    {p.name}: {p.ipv4}, {p.ipv6}  netns {p.netns}")
        results: dict[str, dict[str, float]] = {}
        for mode in ("plain", "accelerated"):
            if mode == "accelerated":
                _say("compiling and attaching the eBPF programs (sockops + sk_msg) at the node cgroup")
                lab.attach_bpf()
            _say(f"{mode}: 8 connections exchange random-sized messages (1 B to 1 MiB) both ways at once;"
                 " SHA-256 of every byte sent and received is compared")
            moved, secs = _checked_transfer(lab, megabytes, 7000 + len(results) * 10)
            print(f"    {moved / 2**20:.0f} MiB moved and verified ({secs:.2f}s, Python hashing included)")
            _say(f"{mode}: 64-byte ping-pong latency (sockperf) and 1-stream throughput (iperf3)")
            m = sockperf_pingpong(lab, 2.0, 7100 + len(results) * 10)
            m["throughput"] = iperf3_throughput(lab, 2.0, 1, 7200 + len(results) * 10)
            results[mode] = m
            print(f"    latency p50 {m['latency_p50_seconds'] * 1e6:.1f} us, p99 {m['latency_p99_seconds'] * 1e6:.1f} us;"
                  f" throughput {m['throughput'] * 8 / 1e9:.2f} Gbit/s")
        _say("what is attached (accel status)")
        d = describe(lab.instance)
        for a in d["attachments"]:
            print(f"    {a['program']} on {a['hook']} -> {a.get('cgroup') or a.get('map')}")
        for name, m in d["maps"].items():
            print(f"    map {name}: {m.get('entries', '-')} entries")
        for k, v in d["counters"].items():
            print(f"    counter {k}: {v}")
        base, acc = results["plain"], results["accelerated"]
        _say(f"result: latency p50 x{acc['latency_p50_seconds'] / base['latency_p50_seconds']:.2f}, "
             f"throughput x{acc['throughput'] / base['throughput']:.2f} (accelerated / plain); all bytes verified")
        _say("removing the lab: namespaces, cgroups, attachments and pins")
    return 0
