"""`python -m bench fastpath [--json]`: pod-to-pod over the lab, plain kernel path (baseline) vs
the sockmap fast path (candidate), measured in the same run on the same lab.

Latency: sockperf ping-pong, 64-byte TCP messages (sockperf reports one-way latency = RTT/2).
Throughput: iperf3, 1 and 4 parallel streams. Rounds alternate plain/accelerated; medians are
reported, since this machine is noisy.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from accel.lab import Lab
from accel.lab_measure import iperf3_throughput, sockperf_pingpong
from bench.common import median, report


def _measure(lab: Lab, seconds: float, port: int) -> dict[str, float]:
    m = sockperf_pingpong(lab, seconds, port)
    m["throughput_1_stream_bytes_per_second"] = iperf3_throughput(lab, seconds, 1, port + 1)
    m["throughput_4_streams_bytes_per_second"] = iperf3_throughput(lab, seconds, 4, port + 2)
    return m


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench fastpath")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--bridge-nf", choices=("on", "off"), default="on",
                    help="bridged traffic through netfilter in the node (on: as on a Kubernetes node with "
                         "br_netfilter, which kube-proxy needs; off: the leanest plain path)")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                    help="compile-time tunable of the eBPF sources for the candidate (for experiments)")
    args = ap.parse_args(argv)
    defines = dict(d.split("=", 1) for d in args.define)
    base: list[dict[str, float]] = []
    cand: list[dict[str, float]] = []
    with Lab(2, attach=False) as lab:
        value = "1" if args.bridge_nf == "on" else "0"
        subprocess.run(["ip", "netns", "exec", lab.node_netns, "sysctl", "-qw",
                        f"net.bridge.bridge-nf-call-iptables={value}", f"net.bridge.bridge-nf-call-ip6tables={value}"],
                       check=False)  # absent without br_netfilter: then there is nothing to switch
        for r in range(args.rounds):
            port = 20000 + r * 10
            base.append(_measure(lab, args.seconds, port))
            lab.attach_bpf(defines)
            try:
                cand.append(_measure(lab, args.seconds, port + 5))
            finally:
                lab.detach_bpf()
            if not args.json:
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    keys = base[0].keys()
    b = {k: median([x[k] for x in base]) for k in keys}
    c = {k: median([x[k] for x in cand]) for k in keys}
    ratio = {k: c[k] / b[k] for k in keys}
    report("fastpath", b, c, ratio, args.json, extra={"rounds": args.rounds, "seconds_per_test": args.seconds,
                                                        "bridge_nf": args.bridge_nf, "defines": defines})
    return 0
