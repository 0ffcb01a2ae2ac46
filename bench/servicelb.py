"""`python -m bench servicelb [--services N ...] [--json]`: socket-level service LB (sock_lb.c driven by
accel.servicelb through the state model) against kube-proxy's own rule layouts, in one run on one lab.

Baselines (kube-proxy's rules live in the node's namespace and catch pod traffic in PREROUTING and
host traffic in OUTPUT; here each mode's rules are in its own client pod's namespace and the client
is a process there, so OUTPUT):
- iptables mode, as kube-proxy >= 1.28 writes it (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*, statistic
  random, MARK/MASQUERADE), applied with `iptables-restore --noflush --counters` on the legacy and the
  nft backend. One change = kube-proxy's partial sync: the filter chains, all of KUBE-SERVICES and
  the changed service's chains.
- nftables mode, as kube-proxy >= 1.31 writes it (table ip kube-proxy, service-ips verdict map, numgen
  vmaps to endpoint chains), through `nft -f`. One change = the transaction for that service.
Candidate: the same services in the lb_* maps; one change = ClusterState.apply() of the Service or
EndpointSlice event, which runs the reconciler's map writes.

(a) time to apply one service change to the last-added service (add it, add a third endpoint,
    remove it again): median of the samples;
(b) connect() + first byte from the most recently added service (its KUBE-SERVICES rule is the
    last one) to two backend pods, over --conns connections per mode and size: p50 with a 95%
    confidence interval (both from the medians of the batches below), and p99.
How (b) is kept honest on a small shared VM: the four clients (one per mode) and both backends are
pinned to ONE CPU, so no cross-CPU wakeup (tens of microseconds here, and the noisiest term) enters
a connection; the connections of a cell run in --batches batches, interleaved with the other
modes' batches in rotating order, so load from elsewhere falls on every mode alike. Our hooks see
only the eBPF client (the one process in the lab's cgroup): the kube-proxy clients and the backends
run outside it. The sockmap fast path is left out (no pod is a local endpoint), so every mode
carries the bytes over the same veth/bridge path: only the LB differs.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from accel.lab import V4_NET, Lab
from accel.lab_measure import pinned, placements
from accel.servicelb import ServiceLBReconciler
from accel.state.model import (
    EMPTY_MAP,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Event,
    EventType,
    Service,
    ServicePort,
    frozen_map,
)
from accel.state.store import ClusterState
from bench.common import machine, machine_line, median, median_ci95, percentile, report
from sockops_bpf import loader
from sockops_bpf.maps import LbMaps, open_lb, open_pinned

NODE = "lab-node"
BACKEND_PORT = 8080
CLUSTER_CIDR = str(V4_NET)
MODES = ("iptables-legacy", "iptables-nft", "nftables")

SERVER = r"""
import socket, struct, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4096)
print("ready", flush=True)
linger = struct.pack("ii", 1, 0)
while True:
    c, _ = s.accept()
    c.sendall(b"x")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    c.close()
"""

# connect() + first byte, one connection at a time, for each request line "host port count warm-up"
# on stdin; one JSON line back. Closes with RST so no TIME_WAIT piles up; one SYN retry at most, so a
# broken rule set fails in seconds instead of hanging.
CLIENT = r"""
import json, socket, struct, sys, time
linger = struct.pack("ii", 1, 0)
for line in sys.stdin:
    host, port, n, warm = line.split()
    port, n, warm = int(port), int(n), int(warm)
    out, errors = [], 0
    for i in range(warm + n):
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
        t0 = time.perf_counter_ns()
        try:
            s.connect((host, port))
            if s.recv(1) != b"x":
                raise OSError("short read")
            t1 = time.perf_counter_ns()
            if i >= warm:
                out.append(t1 - t0)
        except OSError:
            errors += 1
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.close()
    print(json.dumps({"ns": out, "errors": errors}), flush=True)
"""


@dataclass(frozen=True, slots=True)
class Svc:
    name: str
    vip: str
    endpoints: tuple[str, ...]  # backend IPs, port BACKEND_PORT

    @property
    def port_name(self) -> str:  # kube-proxy's ServicePortName string
        return f"default/{self.name}:http"


def vip_of(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def fake_endpoints(i: int) -> tuple[str, ...]:
    """Endpoints of the services nothing connects to: addresses no packet is ever sent to."""
    return (f"10.244.{i // 250}.{i % 250 + 1}", f"10.245.{i // 250}.{i % 250 + 1}")


# ---- kube-proxy, iptables mode ----------------------------------------------------------------


def _hash16(prefix: str, text: str) -> str:
    """kube-proxy's chain names: prefix + first 16 chars of base32(sha256(...))."""
    return prefix + base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def _svc_chain(s: Svc) -> str:
    return _hash16("KUBE-SVC-", s.port_name + "tcp")


def _sep_chain(s: Svc, ip: str) -> str:
    return _hash16("KUBE-SEP-", s.port_name + "tcp" + f"{ip}:{BACKEND_PORT}")


FILTER_TABLE = """*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 \
-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED \
-j ACCEPT
COMMIT
"""

BASE_JUMPS = """*filter
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" \
-j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
COMMIT
*nat
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
COMMIT
"""


def _svc_rules(s: Svc) -> tuple[list[str], list[str]]:
    """(chain declarations, rules) of one service's KUBE-SVC and KUBE-SEP chains."""
    svc = _svc_chain(s)
    chains = [f":{svc} - [0:0]"] + [f":{_sep_chain(s, ip)} - [0:0]" for ip in s.endpoints]
    c = f'-m comment --comment "{s.port_name} cluster IP"'
    rules = [f"-A {svc} {c} -m tcp -p tcp -d {s.vip}/32 --dport 80 ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"]
    n = len(s.endpoints)
    for k, ip in enumerate(s.endpoints):
        cm = f'-m comment --comment "{s.port_name} -> {ip}:{BACKEND_PORT}"'
        prob = f" -m statistic --mode random --probability {1.0 / (n - k):.10f}" if k < n - 1 else ""
        rules.append(f"-A {svc} {cm}{prob} -j {_sep_chain(s, ip)}")
    for ip in s.endpoints:
        sep = _sep_chain(s, ip)
        rules.append(f"-A {sep} -m comment --comment {s.port_name} -s {ip}/32 -j KUBE-MARK-MASQ")
        rules.append(f"-A {sep} -m comment --comment {s.port_name} -m tcp -p tcp -j DNAT "
                     f"--to-destination {ip}:{BACKEND_PORT}")
    return chains, rules


def iptables_sync(services: list[Svc], changed: list[Svc] | None, stale: Sequence[str] = ()) -> str:
    """kube-proxy's restore input: every chain when `changed` is None (full sync), else a partial sync
    that rewrites the filter chains, all of KUBE-SERVICES and only the changed services' chains."""
    nat_chains = [":KUBE-NODEPORTS - [0:0]", ":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]",
                  ":KUBE-POSTROUTING - [0:0]"]
    nat_rules = ["-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
                 "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
                 '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
                 "-j MASQUERADE --random-fully",
                 "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
    for s in services:
        nat_rules.append(f'-A KUBE-SERVICES -m comment --comment "{s.port_name} cluster IP" -m tcp -p tcp '
                         f"-d {s.vip}/32 --dport 80 -j {_svc_chain(s)}")
    for s in services if changed is None else changed:
        ch, ru = _svc_rules(s)
        nat_chains += ch
        nat_rules += ru
    nat_rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the '
                     'last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    nat_chains += [f":{c} - [0:0]" for c in stale]  # declared (= flushed), then deleted, as kube-proxy does
    nat_rules += [f"-X {c}" for c in stale]
    return FILTER_TABLE + "*nat\n" + "\n".join(nat_chains + nat_rules) + "\nCOMMIT\n"


# ---- kube-proxy, nftables mode ------------------------------------------------------------------


def _hash8(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:8]


def _nft_svc_chain(s: Svc) -> str:
    tail = f"default/{s.name}/tcp/http"
    return f"service-{_hash8(tail)}-{tail}"


def _nft_ep_chain(s: Svc, ip: str) -> str:
    tail = f"default/{s.name}/tcp/http__{ip}/{BACKEND_PORT}"
    return f"endpoint-{_hash8(tail)}-{tail}"


NFT_BASE = """add table ip kube-proxy { comment "rules for kube-proxy" ; }
add chain ip kube-proxy mark-for-masquerade
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add chain ip kube-proxy masquerading
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, \
ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap \
to drop or reject packets to services with no endpoints" ; }
add chain ip kube-proxy services
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add chain ip kube-proxy cluster-ips-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of \
ClusterIPs"
add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add chain ip kube-proxy filter-output-post-dnat { type filter hook output priority -90 ; }
add rule ip kube-proxy filter-output-post-dnat ct state new jump cluster-ips-check
add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add rule ip kube-proxy nat-prerouting jump services
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add rule ip kube-proxy nat-output jump services
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add rule ip kube-proxy nat-postrouting jump masquerading
"""


def nft_service(s: Svc, old_endpoints: tuple[str, ...] = (), new: bool = True) -> str:
    """kube-proxy's nft transaction lines for one service (its whole state), as in a sync that changed it."""
    svc = _nft_svc_chain(s)
    out = [f"add chain ip kube-proxy {svc}", f"flush chain ip kube-proxy {svc}",
           f"add rule ip kube-proxy {svc} ip daddr {s.vip} tcp dport 80 ip saddr != {CLUSTER_CIDR} "
           "jump mark-for-masquerade"]
    vmap = " , ".join(f"{k} : goto {_nft_ep_chain(s, ip)}" for k, ip in enumerate(s.endpoints))
    for ip in s.endpoints:
        ep = _nft_ep_chain(s, ip)
        out += [f"add chain ip kube-proxy {ep}", f"flush chain ip kube-proxy {ep}",
                f"add rule ip kube-proxy {ep} ip saddr {ip} jump mark-for-masquerade",
                f"add rule ip kube-proxy {ep} meta l4proto tcp dnat to {ip}:{BACKEND_PORT}"]
    out.append(f"add rule ip kube-proxy {svc} numgen random mod {len(s.endpoints)} vmap {{ {vmap} }}")
    out += [f"delete chain ip kube-proxy {_nft_ep_chain(s, ip)}" for ip in old_endpoints if ip not in s.endpoints]
    if new:
        out += [f"add element ip kube-proxy cluster-ips {{ {s.vip} }}",
                f"add element ip kube-proxy service-ips {{ {s.vip} . tcp . 80 : goto {svc} }}"]
    return "\n".join(out) + "\n"


# ---- running things in the client pod's namespace -------------------------------------------------


# ---- the measurement ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Client:
    """A mode's client: the pod it runs in, and whether it is in the lab's cgroup (where our hooks are)."""
    mode: str
    pod: str
    in_cgroup: bool


# kube-proxy's rules of each mode live in a client pod's own network namespace, and those clients run
# outside the lab's cgroup (our hooks never see them); the eBPF client is the one process in it.
CLIENTS = (Client("iptables-legacy", "pod4", False), Client("iptables-nft", "pod5", False),
           Client("nftables", "pod6", False), Client("ebpf", "pod1", True))
BACKENDS = ("pod2", "pod3")


class PodShell:
    """Runs a tool in a lab pod's network namespace (and times it)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def ns(self, pod: str, argv: list[str], stdin: str | None = None, timeout: float | None = None) -> float:
        """Run a tool in `pod`'s network namespace; seconds it took (the tool's own process included).
        Past `timeout` the tool is killed and subprocess.TimeoutExpired raised."""
        t0 = time.perf_counter()
        p = subprocess.run(["ip", "netns", "exec", self.lab.pod(pod).netns, *argv], input=stdin,
                           capture_output=True, text=True, timeout=timeout)
        secs = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()[:500]}")
        return secs


class LatencyClient:
    """A client process kept running in its pod (pinned to `cpu`): each `measure()` is one batch of
    connections, so batches of the modes can be interleaved and machine noise falls on all alike."""

    def __init__(self, lab: Lab, client: Client, cpu: int) -> None:
        self.client = client
        self.proc = lab.popen(client.pod, pinned([sys.executable, "-c", CLIENT], cpu), in_cgroup=client.in_cgroup,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def measure(self, vip: str, conns: int, warm: int) -> tuple[list[float], int]:
        """Seconds of connect() + first byte of each of `conns` connections, and how many failed."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{vip} 80 {conns} {warm}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.client.mode} latency client exited (code {self.proc.wait()})")
        doc = json.loads(line)
        return [x * 1e-9 for x in doc["ns"]], int(doc["errors"])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _changes(last: Svc) -> list[tuple[Svc, tuple[str, ...]]]:
    """The measured changes to the last service: add it, add a third endpoint, take it away again
    (each with the endpoints it had before). The last leaves it on the two real backends."""
    third = Svc(last.name, last.vip, (*last.endpoints, "10.246.0.1"))
    return [(last, ()), (third, last.endpoints), (last, third.endpoints)]


def sync_iptables(r: PodShell, pod: str, mode: str, services: list[Svc], timeout: float) -> dict[str, float]:
    """Write every service but the last (full sync), then time the changes to the last one. A restore
    still running after `timeout` is killed and reported as taking `timeout` (a lower bound, flagged
    by timed_out = 1); the changes after it are then not measured, nor is latency."""
    restore = [f"iptables-{mode.split('-')[1]}-restore", "--noflush", "--counters"]
    base, last = services[:-1], services[-1]
    m: dict[str, float] = {}
    try:
        m["full_sync_seconds"] = r.ns(pod, restore, iptables_sync(base, None) + BASE_JUMPS, timeout)
        times = []
        for svc, old in _changes(last):
            stale = [_sep_chain(svc, ip) for ip in old if ip not in svc.endpoints]
            times.append(r.ns(pod, restore, iptables_sync([*base, svc], [svc], stale), timeout))
        m["change_seconds"] = median(times)
    except subprocess.TimeoutExpired:
        m.setdefault("full_sync_seconds", timeout)
        m["change_seconds"] = timeout
        m["timed_out"] = 1.0
    return m


def clear_iptables(r: PodShell, pod: str, mode: str) -> None:
    if mode == "iptables-nft":
        r.ns(pod, ["nft", "flush", "ruleset"])  # this namespace holds nothing else; -F/-X is slow at this size
    else:
        for table in ("nat", "filter"):
            r.ns(pod, ["iptables-legacy", "-t", table, "-F"])
            r.ns(pod, ["iptables-legacy", "-t", table, "-X"])


def sync_nftables(r: PodShell, pod: str, services: list[Svc], timeout: float) -> dict[str, float]:
    base, last = services[:-1], services[-1]
    text = NFT_BASE + "".join(nft_service(s) for s in base)
    m: dict[str, float] = {}
    try:
        m["full_sync_seconds"] = r.ns(pod, ["nft", "-f", "-"], text, timeout)
        times = [r.ns(pod, ["nft", "-f", "-"], nft_service(svc, old, new=not old), timeout)
                 for svc, old in _changes(last)]
        m["change_seconds"] = median(times)
    except subprocess.TimeoutExpired:  # reported as at least `timeout`, flagged
        m.setdefault("full_sync_seconds", timeout)
        m.setdefault("change_seconds", timeout)
        m["timed_out"] = 1.0
    return m


def _records(s: Svc) -> tuple[Service, EndpointSlice]:
    svc = Service(name=s.name, namespace="default", uid=s.name, type="ClusterIP", cluster_ips=(s.vip,),
                  ports=(ServicePort("http", "TCP", 80, BACKEND_PORT),), selector=frozen_map({"app": s.name}),
                  session_affinity="None", session_affinity_timeout=None, internal_traffic_policy="Cluster",
                  labels=EMPTY_MAP, annotations=EMPTY_MAP)
    sl = EndpointSlice(name=f"{s.name}-1", namespace="default", service_name=s.name, address_type="IPv4",
                       endpoints=tuple(Endpoint((ip,), True, True, False, NODE) for ip in s.endpoints),
                       ports=(EndpointPort("http", "TCP", BACKEND_PORT),))
    return svc, sl


def sync_ebpf(maps: LbMaps, services: list[Svc]) -> tuple[ClusterState, dict[str, float]]:
    """The same services through the state model into the lb_* maps: the whole set but the last
    (full sync), then the changes to the last one, each a ClusterState.apply() of its events."""
    base, last = services[:-1], services[-1]
    state = ClusterState()
    rec = ServiceLBReconciler(NODE, maps)
    rec.state = state
    state.subscribe(rec.on_change)
    events = [Event(EventType.ADDED, x) for s in base for x in _records(s)]
    t0 = time.perf_counter()
    state.apply(events, synced=True)
    full = time.perf_counter() - t0
    times, ops = [], []
    for svc, old in _changes(last):
        service, sl = _records(svc)
        evs = [Event(EventType.MODIFIED, sl)] if old else [Event(EventType.ADDED, service), Event(EventType.ADDED, sl)]
        before = rec.map_ops
        t0 = time.perf_counter()
        state.apply(evs)
        times.append(time.perf_counter() - t0)
        ops.append(rec.map_ops - before)
    return state, {"full_sync_seconds": full, "change_seconds": median(times),
                   "change_map_operations": float(max(ops))}


def latency_stats(samples: list[float], batch_medians: list[float], errors: int) -> dict[str, float]:
    """The p50 is the median of the batch medians, with a 95% confidence interval from them: it holds
    what the machine's load did between batches, not just the scatter of single connections (which
    would shrink with their number whatever the drift). The p99 is over every connection."""
    lo, hi = median_ci95(batch_medians)
    return {"connect_first_byte_p50_seconds": median(batch_medians),
            "connect_first_byte_p50_ci95_low_seconds": lo, "connect_first_byte_p50_ci95_high_seconds": hi,
            "connect_first_byte_p99_seconds": percentile(samples, 99),
            "connections_measured": float(len(samples)), "failed_connections": float(errors)}


def measure_latency(clients: dict[str, LatencyClient], vip: str, conns: int, batches: int,
                    ) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """`conns` connections per mode to `vip`, in `batches` rounds; each round runs one batch of every
    mode, the order rotating, so a burst of noise from elsewhere on the machine lands on all modes.
    Returns the statistics per mode and the batch medians per mode (index = round)."""
    samples: dict[str, list[float]] = {m: [] for m in clients}
    batch_medians: dict[str, list[float]] = {m: [] for m in clients}
    errors = dict.fromkeys(clients, 0)
    per = max(1, conns // batches)
    order = list(clients)
    for b in range(batches):
        for mode in order[b % len(order):] + order[:b % len(order)]:
            s, e = clients[mode].measure(vip, per, WARM_PER_BATCH)
            samples[mode] += s
            batch_medians[mode].append(median(s))
            errors[mode] += e
    out = {}
    for mode in clients:
        if errors[mode] > len(samples[mode]) // 100 or not samples[mode]:
            raise RuntimeError(f"{mode}: {errors[mode]} of {per * batches} connections to {vip} failed")
        out[mode] = latency_stats(samples[mode], batch_medians[mode], errors[mode])
    return out, batch_medians


def paired_ratio(candidate: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Median of the per-round ratios candidate / baseline and its 95% CI. The two batches of a round
    ran within a fraction of a second of each other, so load from elsewhere divides out of the ratio:
    this is the interval that says whether the two modes differ."""
    ratios = [c / b for c, b in zip(candidate, baseline, strict=True)]
    lo, hi = median_ci95(ratios)
    return median(ratios), lo, hi


WARM_PER_BATCH = 10  # connections before each batch, not counted: the caches the other modes cooled


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench servicelb", description=__doc__.split("\n")[0])
    ap.add_argument("--services", type=int, action="append", metavar="N",
                    help="number of services (repeatable; default 1000 and 10000; 1 is always measured too)")
    ap.add_argument("--conns", type=int, default=10_000,
                    help="connections per latency cell, i.e. per mode and size (default 10000)")
    ap.add_argument("--batches", type=int, default=40,
                    help="the connections of a cell run in this many batches, interleaved with the other "
                         "modes' (default 40)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"kube-proxy modes to compare (default {','.join(MODES)})")
    ap.add_argument("--iptables-nft-max", type=int, default=1000, metavar="N",
                    help="largest size run on the iptables nft backend (its restores grow superlinearly: "
                         "minutes per change at 10,000 services here; default 1000)")
    ap.add_argument("--restore-timeout", type=float, default=240.0, metavar="SECONDS",
                    help="kill one kube-proxy restore after this long and report it as at least that (default 240)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C: the lab and every rule in it are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = sorted({1, *(args.services or [1000, 10000])})
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            print(f"bench servicelb: unknown mode {m!r}; choose from {', '.join(MODES)}", file=sys.stderr)
            return 2
    if args.conns < 100 or not 1 <= args.batches <= args.conns // 10:
        print("bench servicelb: --conns must be at least 100 and --batches between 1 and conns/10", file=sys.stderr)
        return 2
    tools = {"iptables-legacy": "iptables-legacy-restore", "iptables-nft": "iptables-nft-restore", "nftables": "nft"}
    missing = [tools[m] for m in modes if not shutil.which(tools[m])]
    if missing:
        print(f"bench servicelb: {', '.join(missing)} not found; run scripts/setup.sh (iptables, nftables)",
              file=sys.stderr)
        return 2
    if max(sizes) > 62000:
        print("bench servicelb: --services must be at most 62000 (one /16 of service addresses)", file=sys.stderr)
        return 2

    def progress(msg: str) -> None:
        if not args.json:
            print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    cpu = placements()[0].server  # every process of the measurement on this one CPU: see the docstring
    baseline: dict[str, float] = {}
    candidate: dict[str, float] = {}
    paired: dict[str, float] = {}  # median per-round ratio ebpf / mode
    paired_ci: dict[str, list[float]] = {}
    t_start = time.monotonic()
    clients = [c for c in CLIENTS if c.mode in (*modes, "ebpf")]
    with Lab(6, attach=False) as lab:
        r = PodShell(lab)
        servers = [lab.popen(p, pinned([sys.executable, "-c", SERVER, str(BACKEND_PORT)], cpu), in_cgroup=False,
                             stdout=subprocess.PIPE, text=True) for p in BACKENDS]
        running: dict[str, LatencyClient] = {}
        try:
            for s in servers:
                assert s.stdout is not None
                if s.stdout.readline().strip() != "ready":
                    raise RuntimeError("a backend server did not start")
            for c in clients:
                # kube-proxy's rules see a pod's own connections in OUTPUT, after routing: give the service
                # range a route into the lab bridge (nothing leaves the lab: the bridge has no uplink).
                r.ns(c.pod, ["ip", "route", "add", "10.96.0.0/16", "dev", "eth0"])
                running[c.mode] = LatencyClient(lab, c, cpu)
            lab.attach_bpf()
            # The LB alone: no sockmap splicing (no pod is a local endpoint for sockops).
            with open_pinned(loader.pin_dir(lab.instance)) as pm:
                for k in list(pm.local_endpoints):
                    del pm.local_endpoints[k]
            real = (lab.pod("pod2").ipv4, lab.pod("pod3").ipv4)
            with open_lb(loader.pin_dir(lab.instance)) as lb_maps:
                for n in sizes:
                    services = [Svc(f"svc{i}", vip_of(i), fake_endpoints(i)) for i in range(n - 1)]
                    services.append(Svc(f"svc{n - 1}", vip_of(n - 1), real))
                    measured: dict[str, LatencyClient] = {}
                    for c in clients:
                        if c.mode == "iptables-nft" and n > args.iptables_nft_max:
                            progress(f"{n} services: kube-proxy {c.mode} skipped (--iptables-nft-max "
                                     f"{args.iptables_nft_max})")
                            continue
                        progress(f"{n} services: writing them as {c.mode}")
                        key = c.mode.replace("-", "_")
                        if c.mode == "ebpf":
                            state, m = sync_ebpf(lb_maps, services)
                            candidate.update({f"ebpf_n{n}_{k}": v for k, v in m.items()})
                        else:
                            m = sync_nftables(r, c.pod, services, args.restore_timeout) if c.mode == "nftables" \
                                else sync_iptables(r, c.pod, c.mode, services, args.restore_timeout)
                            baseline.update({f"{key}_n{n}_{k}": v for k, v in m.items()})
                        if not m.get("timed_out"):
                            measured[c.mode] = running[c.mode]
                    progress(f"{n} services: connect latency, {args.conns} connections per mode in "
                             f"{args.batches} interleaved batches ({', '.join(measured)})")
                    stats, batch_medians = measure_latency(measured, services[-1].vip, args.conns, args.batches)
                    for mode, lat in stats.items():
                        target = candidate if mode == "ebpf" else baseline
                        target.update({f"{mode.replace('-', '_')}_n{n}_{k}": v for k, v in lat.items()})
                        if mode != "ebpf":
                            med, lo, hi = paired_ratio(batch_medians["ebpf"], batch_medians[mode])
                            name = f"ebpf_over_{mode.replace('-', '_')}_n{n}_connect_first_byte_p50_paired"
                            paired[name] = med
                            paired_ci[name] = [lo, hi]
                    for c in clients:  # empty again for the next size
                        if c.mode == "ebpf":
                            state.apply([Event(EventType.DELETED, x) for s in services for x in _records(s)])
                        elif c.mode == "nftables":
                            r.ns(c.pod, ["nft", "delete", "table", "ip", "kube-proxy"])
                        elif c.mode in measured or baseline.get(f"{c.mode.replace('-', '_')}_n{n}_timed_out"):
                            clear_iptables(r, c.pod, c.mode)
        finally:
            for lc in running.values():
                lc.close()
            for s in servers:
                s.kill()
                s.wait()
    ratio: dict[str, float] = {}
    for n in sizes:
        for mode in modes:
            b = mode.replace("-", "_")
            for k in ("change_seconds", "connect_first_byte_p50_seconds", "connect_first_byte_p99_seconds"):
                if f"{b}_n{n}_{k}" in baseline:
                    ratio[f"ebpf_over_{b}_n{n}_{k}"] = candidate[f"ebpf_n{n}_{k}"] / baseline[f"{b}_n{n}_{k}"]
    ratio.update(paired)
    for n in sizes:
        for q in ("p50", "p99"):
            ratio[f"ebpf_n{n}_over_n1_connect_first_byte_{q}"] = (candidate[f"ebpf_n{n}_connect_first_byte_{q}_seconds"]
                                                                  / candidate[f"ebpf_n1_connect_first_byte_{q}_seconds"])
    extra: dict[str, Any] = {
        "sizes": sizes, "modes": modes, "conns_per_cell": args.conns, "batches": args.batches,
        "endpoints_per_service": 2, "cpu": cpu, "wall_seconds": round(time.monotonic() - t_start, 1),
        "ratio_meaning": "candidate/baseline, as in every benchmark (0.002 = 500x faster); "
                         "ebpf_nN_over_n1: candidate at N services relative to 1 service",
        "spread_meaning": "connect_first_byte_p50: the median of the cell's batch medians; *_ci95_low/high: "
                          "its 95% confidence interval, distribution-free, from the order statistics of the "
                          "batch medians; "
                          "*_paired: the median of the per-round ratios ebpf / mode (batches of one round "
                          "run back to back), its 95% CI in paired_ratio_ci95",
        "paired_ratio_ci95": paired_ci}
    if args.json:
        report("servicelb", baseline, candidate, ratio, True, extra)
        return 0
    _print_table(sizes, modes, baseline, candidate, ratio, extra)
    return 0


def _print_table(sizes: list[int], modes: list[str], base: dict[str, float], cand: dict[str, float],
                 ratio: dict[str, float], extra: dict[str, Any]) -> None:
    print(machine_line("servicelb", machine()))
    cols = [*modes, "ebpf"]

    def get(col: str, n: int, k: str) -> float | None:
        return (cand if col == "ebpf" else base).get(f"{col.replace('-', '_')}_n{n}_{k}")

    def us(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e6:.1f}"

    print(f"  {'services':>8}  {'metric':<30}" + "".join(f"{c:>22}" for c in cols) + "   ebpf / best kube-proxy")
    for n in sizes:
        for k, label in (("full_sync_seconds", "full sync (ms)"), ("change_seconds", "one change (ms)")):
            vals = [get(c, n, k) for c in cols]
            shown = "".join(f"{'-' if v is None else f'{v * 1e3:.3f}':>22}" for v in vals)
            print(f"  {n:>8}  {label:<30}{shown}   {_ratio(vals)}")
        vals = [get(c, n, "connect_first_byte_p50_seconds") for c in cols]
        cells = [f"{us(v)} [{us(get(c, n, 'connect_first_byte_p50_ci95_low_seconds'))}-"
                 f"{us(get(c, n, 'connect_first_byte_p50_ci95_high_seconds'))}]" if v is not None else "-"
                 for c, v in zip(cols, vals, strict=True)]
        p50s = {c: v for c, v in zip(modes, vals, strict=False) if v is not None}  # kube-proxy modes measured
        best = min(p50s, key=p50s.__getitem__) if p50s else ""
        name = f"ebpf_over_{best.replace('-', '_')}_n{n}_connect_first_byte_p50_paired"
        ci = extra["paired_ratio_ci95"].get(name, [0.0, 0.0])
        shown = f"{ratio[name]:10.4f} [{ci[0]:.3f}-{ci[1]:.3f}] vs {best}" if name in ratio else ""
        print(f"  {n:>8}  {'connect+1st byte p50 (us) [CI]':<30}" + "".join(f"{x:>22}" for x in cells)
              + f"   {shown}")
        vals = [get(c, n, "connect_first_byte_p99_seconds") for c in cols]
        print(f"  {n:>8}  {'connect+1st byte p99 (us)':<30}" + "".join(f"{us(v):>22}" for v in vals)
              + f"   {_ratio(vals)}")
        ops = cand.get(f"ebpf_n{n}_change_map_operations", float("nan"))
        print(f"  {n:>8}  {'ebpf map operations per change':<30}{'':>{22 * len(modes)}}{ops:22.0f}")
    print(f"  {extra['conns_per_cell']} connections per latency cell in {extra['batches']} batches interleaved "
          f"across modes; [CI]: 95% confidence interval of the p50 from the batch medians;")
    print("  the p50 ratio is the median of per-round ratios (ebpf batch / kube-proxy batch of the same round) "
          "with its 95% CI")
    print(f"  every client and backend on CPU {extra['cpu']}; wall time {extra['wall_seconds']} s")


def _ratio(vals: list[float | None]) -> str:
    known = [v for v in vals[:-1] if v is not None]
    return f"{vals[-1] / min(known):10.4f}" if known and vals[-1] and min(known) else ""
