"""`python -m bench mtls [--json]`: pod-to-pod across two nodes, three data paths in one run.

- plain: TCP between two pods of the meshaccel lab, not enrolled (no proxy, no encryption): the floor.
- sidecars (baseline): Istio's classic data path, an Envoy sidecar in each pod with static config doing
  mTLS (TLS 1.3, the lab CA's SVIDs, SAN checked both ways). The client application connects to its
  sidecar on 127.0.0.1:PORT, which is where Istio's iptables REDIRECT would send it (without the
  REDIRECT's cost: the baseline is favoured); the client sidecar opens TLS to the server sidecar on
  podIP:15443 (15444 and 15445 for the latency and short-connection ports), which hands the bytes to the application on 127.0.0.1:PORT. These pods live in a second
  two-node lab with no eBPF attached (a sidecar mesh has none: meshaccel's programs would splice the
  sidecars' loopback legs).
- meshaccel (candidate): both pods `strict`; the kernel sends the client's connect() to the node Envoy's
  capture listener in the pod, the two node Envoys carry it as HBONE (TLS 1.3, HTTP/2 CONNECT).

Measured per mode, in rounds that interleave the modes: throughput with 1 and 4 streams (iperf3),
64-byte request/response latency p50/p99 (sockperf, one-way = RTT / 2) left to the scheduler and with every
process of the path pinned to one CPU (`_one_cpu`: no cross-CPU wakeup, which costs tens of microseconds on
a virtual machine and decides the unpinned figure: what is left is the path's own cost), and CPU seconds per GB moved
during the 4-stream run (every process of the path: both applications and their sidecars, read from the
pods' cgroups, or both applications and the two node Envoys, whose CPU comes from /proc), and short
connections per second (one Python client, one after another: connect, a byte each way, close; a sidecar pair
does a TLS handshake per connection, HBONE opens a stream on the tunnel it already has). Ratio =
meshaccel / sidecars. Targets (the issue's): throughput >= 1.2x, p50 <= 0.9x, CPU per GB <= 0.8x.

Config section (`--sections config`): the node Envoy's configuration (bytes of its config dump) and
memory (RSS) with 10 and with 100 enrolled pods on its node and 1,000 enrolled pods on other nodes
(manifest-only), and with 100 local and none elsewhere: it grows with the node's own pods only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from accel.envoy import envoy_binary
from accel.lab import Lab
from accel.lab_agent import LabAgent, LabCluster, write_pods
from accel.lab_certs import Credential, credential
from accel.lab_measure import Cpus, iperf3_throughput, short_connections, sockperf_pingpong, wait_listening
from bench.common import median, process_cpu_seconds, progress_printer, report

PORT = 5201  # iperf3
LATENCY_PORT = 5202  # sockperf (a port of its own: iperf3's server may still be closing)
SHORT_PORT = 5203  # short connections (their TIME_WAITs would keep sockperf, which does not reuse, off its port)
PORTS = {PORT: 15443, LATENCY_PORT: 15444, SHORT_PORT: 15445}  # application port -> the server sidecar's mTLS port
MODES = ("plain", "sidecars", "meshaccel")
TD = "cluster.local"


# --- the sidecar pair ------------------------------------------------------------------------------------


def sidecar_bootstrap(me: Credential, peer_id: str, server_ip: str, inbound: bool, admin: Path) -> dict[str, Any]:
    """A sidecar's static config: per application port (PORTS) one TCP proxy listener. Outbound (the
    client's sidecar): plaintext in on 127.0.0.1:port, mTLS out to the server's sidecar on its inbound
    port. Inbound: mTLS in (client certificate required) on server_ip:inbound port, plaintext out to the
    application on 127.0.0.1:port."""
    tls = {"tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
           "tls_certificates": [{"certificate_chain": {"filename": str(me.cert)},
                                 "private_key": {"filename": str(me.key)}}],
           "validation_context": {"trusted_ca": {"filename": str(me.ca)},
                                  "match_typed_subject_alt_names": [{"san_type": "URI",
                                                                     "matcher": {"exact": peer_id}}]}}
    listeners, clusters = [], []
    for app_port, inbound_port in PORTS.items():
        listen = (server_ip, inbound_port) if inbound else ("127.0.0.1", app_port)
        upstream = ("127.0.0.1", app_port) if inbound else (server_ip, inbound_port)
        name = f"port-{app_port}"
        chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": name, "cluster": name}}]}
        cluster: dict[str, Any] = {
            "name": name, "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": upstream[0], "port_value": upstream[1]}}}}]}]}}
        if inbound:
            chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": True, "common_tls_context": tls}}
        else:
            cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": tls}}
        listeners.append({"name": name, "address": {"socket_address": {"address": listen[0], "port_value": listen[1]}},
                          "filter_chains": [chain]})
        clusters.append(cluster)
    return {"node": {"id": "sidecar", "cluster": "sidecar"},
            "admin": {"address": {"pipe": {"path": str(admin)}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


# --- CPU accounting --------------------------------------------------------------------------------------


def cgroup_cpu_seconds(cgroup: str) -> float:
    for line in (Path(cgroup) / "cpu.stat").read_text().splitlines():
        if line.startswith("usage_usec "):
            return int(line.split()[1]) / 1e6
    raise RuntimeError(f"no usage_usec in {cgroup}/cpu.stat")


def pin_threads(pids: list[int], cpus: set[int]) -> None:
    """Every thread of `pids` onto `cpus` (a thread that ended meanwhile is skipped)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                os.sched_setaffinity(int(tid), cpus)


class Path_:
    """One data path: where its client and server run, what address the client dials, the CPU of every
    process on it, and its proxies' processes outside the two pods (`proxies`)."""

    def __init__(self, mode: str, lab: Lab, client: str, server: str, host: str | None,
                 extra_cpu: Callable[[], float] = lambda: 0.0, proxies: tuple[int, ...] = ()) -> None:
        self.mode, self.lab, self.client, self.server, self.host = mode, lab, client, server, host
        self.extra_cpu = extra_cpu
        self.proxies = proxies

    def processes(self) -> list[int]:
        """Every process of the path now: the two pods' (applications, sidecars) and the proxies."""
        pods = [int(x) for pod in {self.client, self.server}
                for x in (Path(self.lab.pod(pod).cgroup) / "cgroup.procs").read_text().split()]
        return pods + list(self.proxies)

    def cpu_seconds(self) -> float:
        return (cgroup_cpu_seconds(self.lab.pod(self.client).cgroup) + cgroup_cpu_seconds(self.lab.pod(self.server).cgroup)
                + self.extra_cpu())


# --- the setup -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def data_paths(progress: Callable[[str], None]) -> Iterator[dict[str, Path_]]:
    """The meshaccel lab (pod1 -> pod2 plain, pod3 -> pod4 strict) and the sidecar lab (pod1 -> pod2)."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshaccel-bench-mtls-")))
        progress("mtls: the meshaccel lab (two nodes, agents, node Envoys, CA)")
        lab = Lab(4, nodes=2)
        stack.callback(lab.down)
        lab.up()
        cluster = LabCluster(lab, envoy=True, certs=True)
        stack.callback(cluster.down)
        cluster.up()
        cluster.set_pods(annotations={p: {"meshaccel.io/mtls": "strict"} for p in ("pod3", "pod4")})
        deadline = time.monotonic() + 90
        while not ("lab/pod3" in cluster.agents["node1"].status()["capture_ready"]
                   and "lab/pod4" in cluster.agents["node2"].status()["capture_ready"]):
            if time.monotonic() > deadline:
                raise RuntimeError("the node Envoys' listeners in pod3 and pod4 did not come up in 90 s")
            time.sleep(0.2)
        envoys = [a.pid("envoy") for a in cluster.agents.values()]
        if None in envoys:
            raise RuntimeError("a node Envoy is not running")

        progress("mtls: the sidecar lab (two nodes, no eBPF), a static Envoy sidecar in each pod")
        side = Lab(2, nodes=2, attach=False)
        stack.callback(side.down)
        side.up()
        # The lab CA signs the sidecars' SVIDs too (any CA would do; this one is at hand).
        ids = {p: f"spiffe://{TD}/ns/lab/sa/sidecar-{p}" for p in ("pod1", "pod2")}
        creds = {p: credential(tmp, f"sidecar-{p}", ids[p], lab.id) for p in ids}
        server_ip = side.pod("pod2").ipv4
        configs = {
            "pod1": sidecar_bootstrap(creds["pod1"], ids["pod2"], server_ip, False, tmp / "pod1-admin.sock"),
            "pod2": sidecar_bootstrap(creds["pod2"], ids["pod1"], server_ip, True, tmp / "pod2-admin.sock"),
        }
        for pod, cfg in configs.items():
            f = tmp / f"{pod}-sidecar.yaml"
            f.write_text(yaml.safe_dump(cfg))
            # As the node Envoys run: one worker thread.
            proc = side.popen(pod, [envoy_binary(), "-c", str(f), "--disable-hot-restart", "--concurrency", "1",
                                    "-l", "warning", "--log-path", str(tmp / f"{pod}-sidecar.log")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            def stop(p: subprocess.Popen[Any] = proc) -> None:
                p.kill()
                p.wait()
            stack.callback(stop)
        for app_port, inbound_port in PORTS.items():
            wait_listening(side, "pod1", app_port, timeout=30)
            wait_listening(side, "pod2", inbound_port, timeout=30)

        def node_envoys_cpu() -> float:
            return sum(process_cpu_seconds(pid) for pid in envoys if pid is not None)

        yield {"plain": Path_("plain", lab, "pod1", "pod2", None),
               "sidecars": Path_("sidecars", side, "pod1", "pod2", "127.0.0.1"),
               "meshaccel": Path_("meshaccel", lab, "pod3", "pod4", None, node_envoys_cpu,
                                  tuple(pid for pid in envoys if pid is not None))}


def measure(path: Path_, seconds: float, connections: int) -> dict[str, float]:
    one = iperf3_throughput(path.lab, seconds, 1, PORT, server=path.server, client=path.client, host=path.host)
    cpu0 = path.cpu_seconds()
    four = iperf3_throughput(path.lab, seconds, 4, PORT, server=path.server, client=path.client, host=path.host)
    cpu = path.cpu_seconds() - cpu0  # iperf3's start and end included: a little against every mode
    moved = four * seconds
    lat = sockperf_pingpong(path.lab, seconds, LATENCY_PORT, server=path.server, client=path.client, host=path.host)
    first = min(os.sched_getaffinity(0))
    proxies = path.processes()  # sidecars (in the pods) or the node Envoys; sockperf itself runs under taskset
    pin_threads(proxies, {first})
    try:
        lat1 = sockperf_pingpong(path.lab, seconds, LATENCY_PORT, cpus=Cpus(first, first), server=path.server,
                                 client=path.client, host=path.host)
    finally:
        pin_threads(proxies, os.sched_getaffinity(0))
    short = short_connections(path.lab, connections, SHORT_PORT, server=path.server, client=path.client,
                              host=path.host)
    return {"throughput_1_stream_bytes_per_second": one, "throughput_4_streams_bytes_per_second": four,
            "latency_64b_p50_seconds": lat["latency_p50_seconds"], "latency_64b_p99_seconds": lat["latency_p99_seconds"],
            "latency_64b_p50_one_cpu_seconds": lat1["latency_p50_seconds"],
            "latency_64b_p99_one_cpu_seconds": lat1["latency_p99_seconds"],
            "cpu_seconds_per_gb": cpu / (moved / 1e9), "short_connections_per_second": short}


def section_data_path(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with data_paths(progress) as paths:
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                runs[mode].append(measure(paths[mode], args.seconds, args.connections))
                m = runs[mode][-1]
                progress(f"mtls: round {r + 1} {mode}: 1 stream {m['throughput_1_stream_bytes_per_second'] / 1e6:.0f} MB/s, "
                         f"4 streams {m['throughput_4_streams_bytes_per_second'] / 1e6:.0f} MB/s, p50 "
                         f"{m['latency_64b_p50_seconds'] * 1e6:.1f} us ({m['latency_64b_p50_one_cpu_seconds'] * 1e6:.1f} on one CPU), "
                         f"{m['cpu_seconds_per_gb']:.2f} CPU s/GB, {m['short_connections_per_second']:.0f} short conn/s")
    return {mode: {k: median([run[k] for run in rs]) for k in rs[0]} for mode, rs in runs.items()}


# --- the node Envoy's config and memory ------------------------------------------------------------------


def remote_pods(count: int) -> str:
    """`count` enrolled pods on nodes that are not in the lab (their IPs in 10.250.0.0/16)."""
    docs = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"remote-{i}", "namespace": "lab", "uid": f"remote-{i}",
                          "annotations": {"meshaccel.io/mtls": "strict"}, "labels": {"app": f"remote-{i % 50}"}},
             "spec": {"nodeName": f"elsewhere-{i % 20}", "serviceAccountName": f"remote-{i % 50}"},
             "status": {"phase": "Running", "podIPs": [{"ip": f"10.250.{i // 250}.{i % 250 + 1}"}],
                        "conditions": [{"type": "Ready", "status": "True"}]}} for i in range(count)]
    return yaml.safe_dump_all(docs)


def envoy_footprint(agent: LabAgent, enrolled: int, timeout: float = 300) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while len(agent.status()["capture_ready"] or []) != enrolled:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(agent.status()['capture_ready'] or [])} pods captured, not {enrolled}")
        time.sleep(0.5)
    time.sleep(2.0)  # let Envoy finish its listeners' warm-up before reading its memory
    _, dump = agent.envoy_admin("/config_dump?include_eds")
    pid = agent.pid("envoy")
    assert pid is not None
    rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    _, stats = agent.envoy_admin("/stats?filter=^server.memory_allocated$")
    allocated = int(stats.split(":")[1]) if ":" in stats else 0
    return {"config_dump_bytes": float(len(dump.encode())), "envoy_rss_bytes": float(rss),
            "envoy_heap_allocated_bytes": float(allocated)}


def section_config(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    lab = Lab(args.local_pods)
    try:
        lab.up()
        progress(f"mtls config: a lab node with {args.local_pods} pods, its agent and Envoy")
        with LabAgent(lab, envoy=True, certs=True) as agent:
            remote = agent.manifests / "remote-pods.yaml"
            names = sorted(lab.pods, key=lambda p: int(p.removeprefix("pod")))
            for local, elsewhere in ((10, args.remote_pods), (args.local_pods, args.remote_pods), (args.local_pods, 0)):
                if elsewhere:
                    remote.write_text(remote_pods(elsewhere))
                else:
                    remote.unlink(missing_ok=True)
                write_pods(lab, agent.manifests, annotations={p: {"meshaccel.io/mtls": "strict"} for p in names[:local]})
                progress(f"mtls config: {local} enrolled here, {elsewhere} elsewhere")
                out[f"{local}_local_{elsewhere}_remote"] = envoy_footprint(agent, local)
    finally:
        lab.down()
    return out


# --- main ------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench mtls")
    ap.add_argument("--sections", default="data-path,config", help="comma-separated, of: data-path, config")
    ap.add_argument("--seconds", type=float, default=5.0, help="each iperf3 and sockperf run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the three modes (medians reported)")
    ap.add_argument("--connections", type=int, default=1000, help="short connections per mode and round")
    ap.add_argument("--local-pods", type=int, default=100, help="config: enrolled pods on the node (vs 10)")
    ap.add_argument("--remote-pods", type=int, default=1000, help="config: enrolled pods on other nodes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if not sections or any(s not in ("data-path", "config") for s in sections):
        print(f"bench mtls: --sections {args.sections!r}: choose from data-path, config", file=sys.stderr)
        return 2
    if args.seconds <= 0 or args.rounds < 1 or args.connections < 1 or args.local_pods < 11 or args.remote_pods < 0:
        print("bench mtls: --seconds > 0, --rounds >= 1, --connections >= 1, --local-pods > 10, --remote-pods >= 0",
              file=sys.stderr)
        return 2

    progress = progress_printer(args.json)
    baseline: dict[str, float] = {}
    candidate: dict[str, float] = {}
    extra: dict[str, Any] = {}
    if "data-path" in sections:
        by_mode = section_data_path(args, progress)
        baseline.update(by_mode["sidecars"])
        candidate.update(by_mode["meshaccel"])
        extra["plain"] = by_mode["plain"]
        extra["baseline_is"] = "an Envoy sidecar pair with static mTLS config (Istio's classic data path)"
    if "config" in sections:
        fp = section_config(args, progress)
        small, big = f"10_local_{args.remote_pods}_remote", f"{args.local_pods}_local_{args.remote_pods}_remote"
        baseline.update({f"node_envoy_{k}": v for k, v in fp[small].items()})
        candidate.update({f"node_envoy_{k}": v for k, v in fp[big].items()})
        extra["node_envoy_footprint"] = fp
        extra["node_envoy_note"] = (f"node_envoy_*: baseline 10 enrolled pods on the node, candidate "
                                    f"{args.local_pods}; {args.remote_pods} enrolled pods elsewhere in both")
    ratio = {k: candidate[k] / baseline[k] for k in candidate if baseline.get(k)}
    report("mtls", baseline, candidate, ratio, args.json, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
