"""`python -m bench fastpath [--json]`: pod-to-pod over the lab, plain kernel path (baseline) vs
the sockmap fast path (candidate), measured in the same run on the same lab.

What a ping-pong measures depends on where its ends run. On a virtual machine a wakeup on another
CPU costs tens of microseconds, far more than the TCP stack, so a latency measured across CPUs is
mostly the hypervisor's. Hence each latency is measured twice: both ends pinned to ONE CPU (the
stack's own cost: what splicing can change) and on TWO CPUs (what an application placed that way
sees). Two references frame the figures:
- the wakeup floor: a pipe ping-pong between two processes, on one CPU and across two: no network
  stack at all, the least any ping-pong on this machine can take;
- the limit: the same measurements over loopback inside one pod, plain and spliced (the lab
  splices loopback with entries keyed by network namespace): the shortest path two sockets on one
  node can have, so `candidate / spliced loopback` near 1 means pod-to-pod costs what loopback does.

Latency: sockperf ping-pong, 64-byte TCP messages (one-way = RTT / 2). Throughput: iperf3, 1 and 4
parallel streams, server and client pinned to two CPUs (iperf3 is one thread per end). Each round
measures plain and spliced back to back (the order alternates); medians over rounds are reported
with the [min, max] over rounds, since this machine is noisy. A spliced measurement that inserted
no socket into the sockmap stops the run: it would be the plain path under another name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from accel.lab import Lab
from accel.lab_measure import Cpus, iperf3_throughput, pipe_pingpong, placements, sockperf_pingpong
from bench.common import machine, machine_line, median, progress_printer
from sockops_bpf import loader
from sockops_bpf.maps import open_pinned


@dataclass(frozen=True, slots=True)
class Ends:
    """Where the two sockets are: server pod, client pod, the address the client connects to."""
    name: str
    server: str
    client: str
    host: str | None  # None: the server pod's IPv4


POD_TO_POD = Ends("pod_to_pod", "pod1", "pod2", None)
LOOPBACK = Ends("loopback_in_one_pod", "pod1", "pod1", "127.0.0.1")
Series = dict[str, list[float]]  # metric -> one value per round


def _spliced_sockets(lab: Lab) -> int:
    with open_pinned(loader.pin_dir(lab.instance)) as maps:
        return maps.counters()["sockets_inserted"]


def _measure(lab: Lab, path: Ends, seconds: float, port: int, spliced: bool, where: list[Cpus],
             into: Series) -> None:
    """One round of every metric over `path`, appended to `into`."""
    inserted = _spliced_sockets(lab) if spliced else 0
    ends: dict[str, Any] = {"server": path.server, "client": path.client, "host": path.host}
    for cpus in where:
        m = sockperf_pingpong(lab, seconds, port, cpus, **ends)
        port += 1
        into.setdefault(f"latency_{cpus.name}_p50_seconds", []).append(m["latency_p50_seconds"])
        into.setdefault(f"latency_{cpus.name}_p99_seconds", []).append(m["latency_p99_seconds"])
    for streams, key in ((1, "throughput_1_stream_bytes_per_second"), (4, "throughput_4_streams_bytes_per_second")):
        into.setdefault(key, []).append(iperf3_throughput(lab, seconds, streams, port, where[-1], **ends))
        port += 1
    if spliced and _spliced_sockets(lab) == inserted:
        raise RuntimeError(f"the spliced {path.name} run inserted no socket into the sockmap: it measured the "
                           "plain path; is the lab's local_endpoints map filled?")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench fastpath", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per sockperf/iperf3 test (default 3)")
    ap.add_argument("--bridge-nf", choices=("on", "off"), default="on",
                    help="bridged traffic through netfilter in the node (on: as on a Kubernetes node with "
                         "br_netfilter, which kube-proxy needs; off: the leanest plain path)")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                    help="compile-time tunable of the eBPF sources for the candidate (for experiments)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        print("bench fastpath: --rounds must be at least 1 and --seconds above 0", file=sys.stderr)
        return 2
    defines = dict(d.split("=", 1) for d in args.define)
    one_cpu, two_cpus = placements()
    where = [one_cpu, *([two_cpus] if two_cpus else [])]

    progress = progress_printer(args.json)
    t_start = time.monotonic()
    runs: dict[tuple[str, str], Series] = {(mode, p.name): {} for mode in ("plain", "spliced")
                                           for p in (POD_TO_POD, LOOPBACK)}
    floor: Series = {}
    with Lab(2, attach=False) as lab:
        value = "1" if args.bridge_nf == "on" else "0"
        subprocess.run(["ip", "netns", "exec", lab.node_netns, "sysctl", "-qw",
                        f"net.bridge.bridge-nf-call-iptables={value}", f"net.bridge.bridge-nf-call-ip6tables={value}"],
                       check=False)  # absent without br_netfilter: then there is nothing to switch
        for r in range(args.rounds):
            for cpus in where:
                m = pipe_pingpong(cpus, 1.0)
                floor.setdefault(f"latency_{cpus.name}_p50_seconds", []).append(m["latency_p50_seconds"])
                floor.setdefault(f"latency_{cpus.name}_p99_seconds", []).append(m["latency_p99_seconds"])
            for spliced in ((False, True) if r % 2 == 0 else (True, False)):
                mode = "spliced" if spliced else "plain"
                progress(f"[{time.monotonic() - t_start:6.1f}s] round {r + 1}/{args.rounds}: {mode}")
                if spliced:
                    lab.attach_bpf(defines)
                try:
                    for k, path in enumerate((POD_TO_POD, LOOPBACK)):
                        port = 20000 + r * 100 + (50 if spliced else 0) + k * 20
                        _measure(lab, path, args.seconds, port, spliced, where, runs[(mode, path.name)])
                finally:
                    if spliced:
                        lab.detach_bpf()
    wall = time.monotonic() - t_start

    def med(s: Series) -> dict[str, float]:
        return {k: median(v) for k, v in s.items()}

    def over(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: a[k] / b[k] for k in a}

    base, cand = med(runs[("plain", "pod_to_pod")]), med(runs[("spliced", "pod_to_pod")])
    lo_plain, lo_spliced = med(runs[("plain", LOOPBACK.name)]), med(runs[("spliced", LOOPBACK.name)])
    doc: dict[str, Any] = {
        "benchmark": "fastpath",
        "machine": machine(),
        "baseline": base,  # plain pod-to-pod
        "candidate": cand,  # spliced pod-to-pod
        "ratio": over(cand, base),
        "limit_plain_loopback_in_one_pod": lo_plain,
        "limit_spliced_loopback_in_one_pod": lo_spliced,
        "ratio_to_limit": {
            "baseline_over_plain_loopback": over(base, lo_plain),
            "candidate_over_spliced_loopback": over(cand, lo_spliced),
            "candidate_over_plain_loopback": over(cand, lo_plain),
        },
        "wakeup_floor_pipe_pingpong": med(floor),
        "range_over_rounds": {name: {k: [min(v), max(v)] for k, v in s.items()} for name, s in (
            ("baseline", runs[("plain", "pod_to_pod")]), ("candidate", runs[("spliced", "pod_to_pod")]),
            ("limit_plain_loopback_in_one_pod", runs[("plain", LOOPBACK.name)]),
            ("limit_spliced_loopback_in_one_pod", runs[("spliced", LOOPBACK.name)]),
            ("wakeup_floor_pipe_pingpong", floor))},
        "placement": {"one_cpu": f"server and client on CPU {one_cpu.server}",
                      "two_cpus": f"server on CPU {two_cpus.server}, client on CPU {two_cpus.client}"
                      if two_cpus else "not measured: this process may use one CPU only",
                      "throughput": where[-1].name},
        "latency_is": "one-way = round trip / 2 (sockperf ping-pong, 64-byte TCP messages)",
        "rounds": args.rounds,
        "seconds_per_test": args.seconds,
        "wall_seconds": round(wall, 1),
        "bridge_nf": args.bridge_nf,
        "defines": defines,
    }
    if args.json:
        print(json.dumps(doc))
    else:
        _print_table(doc)
    return 0


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f}" if seconds < 1e-4 else f"{seconds * 1e6:.0f}"


def _gbit(bytes_per_second: float) -> str:
    return f"{bytes_per_second * 8 / 1e9:.2f}"


def _print_table(doc: dict[str, Any]) -> None:
    print(machine_line("fastpath", doc["machine"]))
    rng = doc["range_over_rounds"]
    cols: list[tuple[str, str]] = [("baseline", "plain"), ("candidate", "spliced"),
                                   ("limit_plain_loopback_in_one_pod", "plain"),
                                   ("limit_spliced_loopback_in_one_pod", "spliced")]
    print(f"  median of {doc['rounds']} rounds [min-max], {doc['seconds_per_test']} s per test; "
          f"latency is {doc['latency_is']}")
    w = 25  # one cell: "median [min-max]"
    print(f"  {'':34}{'pod to pod':^{2 * w}}{'loopback in one pod (the limit)':^{2 * w}}")
    print(f"  {'metric':34}" + "".join(f"{c[1]:>{w}}" for c in cols)
          + f"{'spliced/plain':>15}{'plain/limit':>13}{'spliced/limit':>15}")
    for key in doc["baseline"]:
        fmt, unit = (_gbit, "Gbit/s") if key.startswith("throughput") else (_us, "us")
        label = key.replace("_seconds", "").replace("_bytes_per_second", "") + f" ({unit})"
        cells = "".join(f"{f'{fmt(doc[c[0]][key])} [{fmt(rng[c[0]][key][0])}-{fmt(rng[c[0]][key][1])}]':>{w}}"
                        for c in cols)
        lim = doc["ratio_to_limit"]
        print(f"  {label:34}{cells}{doc['ratio'][key]:15.3f}{lim['baseline_over_plain_loopback'][key]:13.3f}"
              f"{lim['candidate_over_spliced_loopback'][key]:15.3f}")
    fl = doc["wakeup_floor_pipe_pingpong"]
    parts = [f"{name.replace('_', ' ')} p50 {_us(fl[f'latency_{name}_p50_seconds'])} us, "
             f"p99 {_us(fl[f'latency_{name}_p99_seconds'])} us" for name in ("one_cpu", "two_cpus")
             if f"latency_{name}_p50_seconds" in fl]
    print(f"  wakeup floor (pipe ping-pong, one-way, no network stack): {'; '.join(parts)}")
    print(f"  placement: one_cpu = {doc['placement']['one_cpu']}; two_cpus = {doc['placement']['two_cpus']}; "
          f"throughput on {doc['placement']['throughput']}")
    print(f"  wall time {doc['wall_seconds']} s")
