"""Latency and throughput between two lab pods with the standard tools (sockperf, iperf3): what the
demo shows and the fastpath benchmark compares. Both tools come from scripts/setup.sh."""

from __future__ import annotations

import json
import re
import subprocess
import time

from accel.lab import Lab

PCT = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")


def sockperf_pingpong(lab: Lab, seconds: float, port: int) -> dict[str, float]:
    ip = lab.pod("pod1").ipv4
    server = lab.popen("pod1", ["sockperf", "sr", "--tcp", "-i", ip, "-p", str(port)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = lab.run("pod2", ["sockperf", "pp", "--tcp", "-i", ip, "-p", str(port), "-t", str(seconds),
                               "-m", "64"], capture_output=True, text=True, timeout=seconds + 30)
    finally:
        server.kill()
        server.wait()
    pct = {float(a): float(b) * 1e-6 for a, b in PCT.findall(out.stdout + out.stderr)}
    if 50.0 not in pct:
        raise RuntimeError(f"sockperf gave no percentiles: {out.stdout[-500:]} {out.stderr[-500:]}")
    return {"latency_p50_seconds": pct[50.0], "latency_p99_seconds": pct[99.0]}


def iperf3_throughput(lab: Lab, seconds: float, streams: int, port: int) -> float:
    ip = lab.pod("pod1").ipv4
    server = lab.popen("pod1", ["iperf3", "-s", "-1", "-B", ip, "-p", str(port)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = lab.run("pod2", ["iperf3", "-c", ip, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"],
                      capture_output=True, text=True, timeout=seconds + 30)
    finally:
        server.kill()
        server.wait()
    doc = json.loads(out.stdout)
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 8  # bytes per second
