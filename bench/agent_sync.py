"""agent-sync: initial sync of N services / M endpoints from the in-process API server, then K
single-endpoint changes; time to ready, event-to-map latency p50/p99, agent RSS.

Baseline: the same agent, but every batch of events rebuilds the whole local endpoint table from
the model and rewrites the differences (a full resync per event, what kube-proxy's iptables mode
does with iptables-restore). Candidate: the incremental reconciler. Each mode runs in its own
process (so RSS is its own); the API server runs in a forked child, so its memory is not counted.
Event time is the server's write (CLOCK_MONOTONIC is shared by processes); map time is the write
into the map, here an in-memory mapping (no eBPF compile in this benchmark).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.common import percentile, report

NODE = "node-0"


def _ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def _objects(services: int, endpoints: int, nodes: int) -> Iterator[dict[str, Any]]:
    per = max(1, endpoints // services)
    namespaces = max(1, services // 100)
    for n in range(namespaces):
        yield {"kind": "Namespace", "metadata": {"name": f"ns{n}"}}
    for s in range(services):
        ns = f"ns{s % namespaces}"
        yield {"kind": "Service", "metadata": {"name": f"svc{s}", "namespace": ns},
               "spec": {"clusterIP": f"172.16.{s >> 8 & 255}.{s & 255}", "selector": {"app": f"svc{s}"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
        eps = []
        for j in range(per):
            i = s * per + j
            node = f"node-{i % nodes}"
            yield _pod(i, ns, s, node, _ip(i + 1))
            eps.append({"addresses": [_ip(i + 1)], "conditions": {"ready": True}, "nodeName": node,
                        "targetRef": {"kind": "Pod", "namespace": ns, "name": f"pod{i}"}})
        yield {"kind": "EndpointSlice", "metadata": {"name": f"svc{s}-abc", "namespace": ns,
                                                     "labels": {"kubernetes.io/service-name": f"svc{s}"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}


def _pod(i: int, ns: str, s: int, node: str, ip: str) -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": f"pod{i}", "namespace": ns, "labels": {"app": f"svc{s}"}},
            "spec": {"nodeName": node, "serviceAccountName": f"sa{s % 50}"},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def _server_child(conn: Connection, services: int, endpoints: int, nodes: int) -> None:
    """The API server process: builds the cluster, then performs changes on request."""
    from accel.kubefake import FakeApiServer

    srv = FakeApiServer().start()
    srv.apply_many(_objects(services, endpoints, nodes))
    conn.send(srv.url)
    per = max(1, endpoints // services)
    namespaces = max(1, services // 100)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        k, i = msg  # change k: endpoint i (a pod on this node) gets a new IP, its slice follows
        s = i // per
        ns = f"ns{s % namespaces}"
        new_ip = f"11.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}"
        t0 = time.monotonic()
        srv.apply(_pod(i, ns, s, NODE, new_ip))
        sl = srv.get("EndpointSlice", ns, f"svc{s}-abc")
        assert sl is not None
        for ep in sl["endpoints"]:
            if ep["targetRef"]["name"] == f"pod{i}":
                ep["addresses"] = [new_ip]
        srv.apply(sl)
        conn.send((new_ip, t0))
    srv.stop()


class TimedMap(dict[str, int]):
    """The map under test: remembers when each key was last written and wakes the waiter."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, float] = {}
        self.cond = threading.Condition()

    def __setitem__(self, k: str, v: int) -> None:
        super().__setitem__(k, v)
        with self.cond:
            self.written[k] = time.monotonic()
            self.cond.notify_all()

    def wait_for(self, k: str, timeout: float) -> float | None:
        with self.cond:
            self.cond.wait_for(lambda: k in self.written, timeout)
            return self.written.get(k)


def _rss() -> tuple[int, int]:
    """(current, peak) resident set of this process, bytes."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def worker(mode: str, services: int, endpoints: int, changes: int, nodes: int) -> dict[str, float]:
    import logging

    from accel.agent import Agent, AgentConfig
    from accel.reconcile import LocalEndpointsReconciler, on_node
    from accel.sources.kube import KubeSource, load_api_client
    from accel.state.model import ChangeSet

    class FullResync(LocalEndpointsReconciler):
        """Baseline: every change rebuilds the whole table from the model and rewrites differences."""

        def on_change(self, cs: ChangeSet) -> None:
            if not (cs.synced or self.synced) or self.state is None:
                return
            self.synced = True
            want = {ip: w.security_identity for w in self.state.workloads() if on_node(w, self.node)
                    for ip in w.pod.ips}
            actual = dict(self.table.items())
            for ip in actual.keys() - want.keys():
                del self.table[ip]
            for ip, ident in want.items():
                if actual.get(ip) != ident:
                    self.table[ip] = ident

        def desired(self) -> dict[str, int]:
            return dict(self.table)

    logging.basicConfig(level=logging.WARNING)
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_server_child, args=(child, services, endpoints, nodes), daemon=True)
    proc.start()
    url = parent.recv()
    with tempfile.TemporaryDirectory() as tmp:
        kc = Path(tmp) / "kubeconfig"
        kc.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "b",
            "clusters": [{"name": "b", "cluster": {"server": url}}],
            "users": [{"name": "b", "user": {"token": "meshaccel-test-token"}}],
            "contexts": [{"name": "b", "context": {"cluster": "b", "user": "b"}}]}))
        table = TimedMap()
        agent = Agent(AgentConfig(node=NODE, state_dir=Path(tmp)), KubeSource(load_api_client(str(kc))), table,
                      reconciler=FullResync if mode == "baseline" else LocalEndpointsReconciler)
        t0 = time.monotonic()
        agent.start()
        if not agent.ready.wait(300):
            raise SystemExit("agent-sync: the agent never became ready")
        ready = time.monotonic() - t0
        rss_ready, _ = _rss()
        local = [i for i in range(endpoints) if i % nodes == 0]
        lat = []
        for k in range(changes):
            parent.send((k + 1, local[k % len(local)]))
            new_ip, t_event = parent.recv()
            t_map = table.wait_for(new_ip, 60)
            if t_map is None:
                raise SystemExit(f"agent-sync: change {k} never reached the map")
            lat.append(t_map - t_event)
        rss_end, peak = _rss()
        agent.stop()
        parent.send(None)
        proc.join(10)
    return {
        "time_to_ready_seconds": ready,
        "event_to_map_p50_seconds": percentile(lat, 50),
        "event_to_map_p99_seconds": percentile(lat, 99),
        "event_to_map_max_seconds": max(lat) if lat else float("nan"),
        "rss_after_sync_bytes": float(rss_ready),
        "rss_peak_bytes": float(peak),
        "local_endpoints": float(len(table)),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench agent-sync", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=50_000)
    ap.add_argument("--changes", type=int, default=1_000)
    ap.add_argument("--nodes", type=int, default=100, help="pods spread over this many nodes; the agent is node-0")
    ap.add_argument("--worker", choices=("baseline", "candidate"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.services, a.endpoints, a.changes, a.nodes)))
        return 0
    results = {}
    for mode in ("baseline", "candidate"):
        if not a.json:
            print(f"agent-sync: {mode}: {a.services} services, {a.endpoints} endpoints, {a.changes} changes ...",
                  file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, "-m", "bench", "agent-sync", "--worker", mode,
                              "--services", str(a.services), "--endpoints", str(a.endpoints),
                              "--changes", str(a.changes), "--nodes", str(a.nodes)],
                             capture_output=True, text=True,
                             env=dict(os.environ))
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    b, c = results["baseline"], results["candidate"]
    ratio = {k: c[k] / b[k] for k in b if b.get(k) and k != "local_endpoints"}
    report("agent-sync", b, c, ratio, a.json, extra={
        "scale": {"services": a.services, "endpoints": a.endpoints, "changes": a.changes, "nodes": a.nodes},
        "notes": "ratio = candidate / baseline (as in every benchmark); maps are in-memory (no eBPF compile in this run)",
    })
    return 0
