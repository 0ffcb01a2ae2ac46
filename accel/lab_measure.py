"""Latency and throughput between lab sockets with the standard tools (sockperf, iperf3), short
connections (a Python client), and the machine's wakeup floor: what the demo shows and the benchmarks
compare. Both tools come
from scripts/setup.sh; `taskset` (util-linux) pins them.

Where the two ends run decides what a ping-pong measures. On a virtual machine, waking a process
on another CPU costs tens of microseconds (an inter-processor interrupt through the hypervisor),
several times the TCP stack itself; on one CPU the wakeup is a context switch of about a
microsecond. So every measurement here takes a `Cpus` placement, and `pipe_pingpong` measures
the floor under it: two processes bouncing a byte through pipes, no network stack at all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from accel.lab import Lab

PCT = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")


@dataclass(frozen=True, slots=True)
class Cpus:
    """Where the two ends of a measurement run: server and client, each pinned to one CPU."""
    server: int
    client: int

    @property
    def name(self) -> str:
        return "one_cpu" if self.server == self.client else "two_cpus"


def placements() -> tuple[Cpus, Cpus | None]:
    """Both ends on one CPU, and on two CPUs (None when this process may use only one)."""
    cpus = sorted(os.sched_getaffinity(0))
    return Cpus(cpus[0], cpus[0]), (Cpus(cpus[0], cpus[1]) if len(cpus) > 1 else None)


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else list(argv)


def wait_listening(lab: Lab, pod: str, port: int, timeout: float = 10.0) -> None:
    """Return once something in `pod` listens on TCP `port` (a server just started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.run(pod, ["ss", "-Htln", f"sport = :{port}"], in_cgroup=False, capture_output=True, text=True)
        if out.stdout.strip():
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} in {pod} after {timeout:.0f}s")


def sockperf_pingpong(lab: Lab, seconds: float, port: int, cpus: Cpus | None = None, server: str = "pod1",
                      client: str = "pod2", host: str | None = None) -> dict[str, float]:
    """One-way latency (sockperf: RTT / 2) of 64-byte TCP messages from `client` to a server in
    `server` at `host` (default: the server pod's IPv4; 127.0.0.1 with server == client is loopback
    inside one pod). `cpus` pins both ends; None leaves them to the scheduler."""
    ip = host or lab.pod(server).ipv4
    proc = lab.popen(server, pinned(["sockperf", "sr", "--tcp", "-i", ip, "-p", str(port)], cpus.server if cpus else None),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(lab, server, port)
        out = lab.run(client, pinned(["sockperf", "pp", "--tcp", "-i", ip, "-p", str(port), "-t", str(seconds),
                                      "-m", "64"], cpus.client if cpus else None),
                      capture_output=True, text=True, timeout=seconds + 30)
    finally:
        proc.kill()
        proc.wait()
    pct = {float(a): float(b) * 1e-6 for a, b in PCT.findall(out.stdout + out.stderr)}
    if 50.0 not in pct:
        raise RuntimeError(f"sockperf gave no percentiles: {out.stdout[-500:]} {out.stderr[-500:]}")
    return {"latency_p50_seconds": pct[50.0], "latency_p99_seconds": pct[99.0]}


def iperf3_throughput(lab: Lab, seconds: float, streams: int, port: int, cpus: Cpus | None = None,
                      server: str = "pod1", client: str = "pod2", host: str | None = None) -> float:
    """Bytes per second received over `streams` parallel TCP streams (iperf3 is one thread: `cpus`
    pins each end to one CPU)."""
    ip = host or lab.pod(server).ipv4
    proc = lab.popen(server, pinned(["iperf3", "-s", "-1", "-B", ip, "-p", str(port)], cpus.server if cpus else None),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(lab, server, port)
        out = lab.run(client, pinned(["iperf3", "-c", ip, "-p", str(port), "-t", str(seconds), "-P", str(streams),
                                      "-J"], cpus.client if cpus else None),
                      capture_output=True, text=True, timeout=seconds + 30)
    finally:
        proc.kill()
        proc.wait()
    try:
        doc = json.loads(out.stdout)
        return float(doc["end"]["sum_received"]["bits_per_second"]) / 8
    except (ValueError, KeyError) as e:
        raise RuntimeError(f"iperf3 gave no result ({e}): {out.stdout[-500:]} {out.stderr[-500:]}") from None


def pipe_pingpong(cpus: Cpus, seconds: float) -> dict[str, float]:
    """The wakeup floor: this process and a forked child bounce one byte through two pipes, each
    pinned as `cpus` says; one-way latency = RTT / 2 per round trip, as sockperf counts it. Python's
    share (two os.read/os.write calls) is a few hundred nanoseconds of it."""
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: echo until told to stop; never returns into the caller's code
        try:
            os.sched_setaffinity(0, {cpus.server})
            while os.read(to_child_r, 1) == b"x":
                os.write(to_parent_w, b"x")
        finally:
            os._exit(0)
    before = os.sched_getaffinity(0)
    rtts: list[int] = []
    try:
        os.sched_setaffinity(0, {cpus.client})
        clock, write, read = time.perf_counter_ns, os.write, os.read
        end = clock() + int(seconds * 1e9)
        t1 = 0
        while t1 < end:
            t0 = clock()
            write(to_child_w, b"x")
            read(to_parent_r, 1)
            t1 = clock()
            rtts.append(t1 - t0)
    finally:
        os.sched_setaffinity(0, before)
        os.write(to_child_w, b"q")
        os.waitpid(pid, 0)
        for fd in (to_child_r, to_child_w, to_parent_r, to_parent_w):
            os.close(fd)
    rtts.sort()
    return {"latency_p50_seconds": rtts[len(rtts) // 2] / 2e9,
            "latency_p99_seconds": rtts[min(len(rtts) - 1, round(0.99 * (len(rtts) - 1)))] / 2e9}


# One client making connections one after another: connect, one byte each way, close.
SHORT_SERVER = r"""
import socket, sys, threading
s = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=1024)
print("listening", flush=True)
def serve(c):
    with c:
        c.recv(1); c.sendall(b"y")
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
SHORT_CLIENT = r"""
import socket, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
for _ in range(n):
    with socket.create_connection((ip, port)) as c:
        c.sendall(b"x")
        assert c.recv(1) == b"y"
print(n / (time.perf_counter() - t0))
"""


def short_connections(lab: Lab, connections: int, port: int, server: str = "pod1", client: str = "pod2",
                      host: str | None = None) -> float:
    """Connections per second that one client in `client` makes, one after another, to a server in
    `server` at `host` (default: the server pod's IPv4), each carrying one byte each way: what a
    connection's set-up and tear-down cost on the path (a Python client: its own cost included)."""
    ip = host or lab.pod(server).ipv4
    proc = lab.popen(server, [sys.executable, "-c", SHORT_SERVER, ip, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "listening":
            raise RuntimeError(f"the short-connection server in {server} did not start")
        out = lab.run(client, [sys.executable, "-c", SHORT_CLIENT, ip, str(port), str(connections)],
                      capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"short connections failed: {out.stderr[-1000:]}")
        return float(out.stdout.strip())
    finally:
        proc.kill()
        proc.wait()
