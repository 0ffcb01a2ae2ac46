"""`python -m bench xds [--json] [--streams N] [--clusters N] [--rounds N]`

200 concurrent ADS streams (in-process gRPC clients) subscribed to 1,000 clusters and their endpoints;
one endpoint changes; how long until every stream has it, how many bytes went out, the server's RSS.
Baseline: State-of-the-World (every stream gets all 1,000 load assignments again); candidate: Delta
(only the changed one). The server runs in a child process so its RSS is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import grpc

from bench.common import report

NODE = "bench"


def _snapshot(version: int, clusters: int) -> Any:
    from meshxds import resources as R
    from meshxds.cache import Snapshot

    # Cluster 0's endpoint port moves with the version: that is the one change per round.
    return Snapshot.build(
        str(version),
        clusters=[R.eds_cluster(f"c{i}") for i in range(clusters)],
        endpoints=[R.load_assignment(f"c{i}", [R.Backend(f"10.1.{i // 250}.{i % 250 + 1}",
                                                         8080 + (version if i == 0 else 0))])
                   for i in range(clusters)],
    )


def _serve_child(clusters: int) -> int:
    """Child: serve ADS; stdin commands `set V` (new snapshot) and `rss`; answers on stdout."""
    from meshxds.cache import SnapshotCache
    from meshxds.server import XdsServer

    cache = SnapshotCache()
    cache.set_snapshot(NODE, _snapshot(1, clusters))
    server = XdsServer(cache)
    print(server.start("127.0.0.1:0"), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "set":
            cache.set_snapshot(NODE, _snapshot(int(arg), clusters))
            print("ok", flush=True)
        elif cmd == "rss":
            print(_rss(os.getpid()), flush=True)
    server.stop()
    return 0


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _Child:
    def __init__(self, clusters: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.xds", "--serve", str(clusters)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.address = self._line()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError("bench xds: the server child exited")
        return line

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _client(address: str, delta: bool, clusters: int, seen: dict[int, asyncio.Event],
                  counters: dict[str, int], stop: asyncio.Event) -> None:
    from envoy.service.discovery.v3 import discovery_pb2

    from meshxds.cache import ENDPOINT

    method = "DeltaAggregatedResources" if delta else "StreamAggregatedResources"
    resp_cls = discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.stream_stream(f"/envoy.service.discovery.v3.AggregatedDiscoveryService/{method}",
                                request_serializer=lambda b: b, response_deserializer=lambda b: b)()
        names = [f"c{i}" for i in range(clusters)]
        if delta:
            await call.write(discovery_pb2.DeltaDiscoveryRequest(
                node={"id": NODE}, type_url=ENDPOINT, resource_names_subscribe=names).SerializeToString())
        else:
            await call.write(discovery_pb2.DiscoveryRequest(node={"id": NODE}, type_url=ENDPOINT,
                                                            resource_names=names).SerializeToString())
        reader = asyncio.ensure_future(call.read())
        stopper = asyncio.ensure_future(stop.wait())
        while True:
            done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                reader.cancel()
                call.cancel()
                return
            raw = reader.result()
            if raw is grpc.aio.EOF:
                return
            counters["bytes"] += len(raw)
            r: Any = resp_cls.FromString(raw)
            version = int(r.system_version_info if delta else r.version_info)
            if delta:
                ack = discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, response_nonce=r.nonce)
            else:
                ack = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names,
                                                     version_info=r.version_info, response_nonce=r.nonce)
            await call.write(ack.SerializeToString())
            counters[f"got{version}"] = counters.get(f"got{version}", 0) + 1
            ev = seen.get(version)
            if ev is not None and counters[f"got{version}"] >= counters["streams"]:
                ev.set()
            reader = asyncio.ensure_future(call.read())


async def _measure(delta: bool, streams: int, clusters: int, rounds: int) -> dict[str, float]:
    child = _Child(clusters)
    try:
        seen = {v: asyncio.Event() for v in range(1, rounds + 2)}
        counters = {"bytes": 0, "streams": streams}
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(_client(child.address, delta, clusters, seen, counters, stop))
                 for _ in range(streams)]
        await asyncio.wait_for(seen[1].wait(), 300)
        initial_bytes = counters["bytes"]
        times, sizes = [], []
        for v in range(2, rounds + 2):
            before = counters["bytes"]
            t0 = time.perf_counter()
            await asyncio.get_running_loop().run_in_executor(None, child.ask, f"set {v}")
            await asyncio.wait_for(seen[v].wait(), 300)
            times.append(time.perf_counter() - t0)
            sizes.append(counters["bytes"] - before)
            print(f"  {'delta' if delta else 'sotw '} round {v - 1}/{rounds}: {times[-1]:.3f}s", file=sys.stderr)
        rss = int(await asyncio.get_running_loop().run_in_executor(None, child.ask, "rss"))
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {
            "push_one_endpoint_change_to_all_seconds": statistics.median(times),
            "bytes_sent_for_one_change": statistics.median(sizes),
            "initial_sync_bytes": float(initial_bytes),
            "server_rss_bytes": float(rss),
        }
    finally:
        child.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        return _serve_child(int(argv[1]))
    p = argparse.ArgumentParser(prog="python -m bench xds")
    p.add_argument("--json", action="store_true")
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    print(f"bench xds: {a.streams} streams x {a.clusters} clusters, {a.rounds} rounds per variant", file=sys.stderr)
    base = asyncio.run(_measure(False, a.streams, a.clusters, a.rounds))
    cand = asyncio.run(_measure(True, a.streams, a.clusters, a.rounds))
    ratio = {k: (cand[k] / base[k] if base[k] else float("nan")) for k in base}
    report("xds (baseline: SotW, candidate: Delta)", base, cand, ratio, a.json,
           extra={"streams": a.streams, "clusters": a.clusters, "rounds": a.rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
