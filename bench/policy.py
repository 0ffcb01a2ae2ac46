"""`python -m bench policy [--sections compile,...] [--policies N] [--pods N] [--json]`: identity policy.

Sections (each prints its baseline, candidate and ratio = candidate / baseline; `--sections` picks):
- compile: the compiler (accel/policy) with --policies policies and --pods pods in force, as one node's
  agent runs it (its --pods / --nodes local pods are the subjects). One change = one policy edited
  (its port moves, and back). Baseline: recompiling the node from scratch for that change (what a
  compiler without incremental updates would do). Candidate: PolicyCompiler.on_change of the change's
  ChangeSet (the subjects it touches, and the entry diff in write order). p50/p99 over --changes
  changes; the same for a pod of a new identity appearing (a new peer of many subjects); also the
  entries in force, per policy and per local subject, and the map writes per change.
- connect, enforce, revoke: the kernel, on one lab node with the real agent (bench/_policy_kernel.py):
  connect() latency without and with the cluster's policies in the maps; policy event (the API
  server's write) -> the client's first EACCES; closing 1,000 connections by revocation vs by the
  application itself.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from accel.policy.compiler import PolicyCompiler, PolicyOptions
from accel.policy.evaluate import compile_all
from accel.policy.types import PolicyDiff
from accel.state.model import ChangeSet, Event, EventType, Kind, Record
from accel.state.parse import parse_object
from accel.state.store import ClusterState
from bench._policy_kernel import PolicyNode, section_connect, section_enforce, section_revoke
from bench.common import Progress, median, percentile, progress_printer, report

NODE = "node-0"


@dataclass
class SectionResult:
    baseline: dict[str, float] = field(default_factory=dict)
    candidate: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)




# --- a synthetic cluster --------------------------------------------------------------------------


def synthetic_cluster(pods: int, policies: int, namespaces: int, nodes: int, seed: int = 1) -> list[dict[str, Any]]:
    """Namespaces of apps (10 replicas each, one service account per app), spread over `nodes`, and
    `policies` policies of the kinds clusters have: per namespace a default deny, allows from pods of
    the namespace, from namespaces by label, port ranges, named ports, egress to a tier and to DNS,
    ipBlocks with except, and Istio ALLOW by principal and DENY by namespace."""
    rng = random.Random(seed)
    objs: list[dict[str, Any]] = []
    apps_per_ns = max(1, pods // namespaces // 10)
    for n in range(namespaces):
        objs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": f"ns-{n}", "labels": {"team": f"t{n % 10}", "env": ("prod", "dev")[n % 2]}}})
    i = 0
    for n in range(namespaces):
        for a in range(apps_per_ns):
            for r in range(10):
                i += 1
                objs.append({"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": f"app-{a}-{r}", "namespace": f"ns-{n}",
                                          "labels": {"app": f"app-{a}", "tier": ("fe", "be", "db")[a % 3]}},
                             "spec": {"nodeName": f"node-{rng.randrange(nodes)}", "serviceAccountName": f"app-{a}",
                                      "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                             "status": {"phase": "Running", "podIPs": [{"ip": f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}"}]}})
    per_ns = max(1, policies // namespaces)
    made = 0
    for n in range(namespaces):
        ns = f"ns-{n}"
        for k in range(per_ns):
            if made >= policies:
                break
            made += 1
            app = f"app-{k % apps_per_ns}"
            other = f"app-{(k + 1) % apps_per_ns}"
            kind = k % 10
            meta = {"name": f"p{k}", "namespace": ns}
            if kind == 0:
                spec: dict[str, Any] = {"podSelector": {}, "policyTypes": ["Ingress"]}
            elif kind in (1, 2):
                spec = {"podSelector": {"matchLabels": {"app": app}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": other}}}],
                                     "ports": [{"port": 8080}]}]}
            elif kind == 3:
                spec = {"podSelector": {"matchLabels": {"app": app}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{(n + 1) % 10}"}}}],
                                     "ports": [{"port": 9000, "endPort": 9099}]}]}
            elif kind == 4:
                spec = {"podSelector": {"matchLabels": {"tier": "fe"}}, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"podSelector": {"matchLabels": {"tier": "be"}}}], "ports": [{"port": "http"}]},
                                   {"ports": [{"port": 53, "protocol": "UDP"}]}]}
            elif kind == 5:
                spec = {"podSelector": {"matchLabels": {"app": app}},
                        "ingress": [{"from": [{"ipBlock": {"cidr": f"172.{16 + n % 16}.0.0/16",
                                                           "except": [f"172.{16 + n % 16}.{k}.0/24"]}}]}]}
            elif kind == 6:
                spec = {"podSelector": {"matchLabels": {"app": app}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}},
                                               "podSelector": {"matchLabels": {"tier": "fe"}}}],
                                     "ports": [{"port": "http"}]}]}
            elif kind in (7, 8):
                objs.append({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta,
                             "spec": {"selector": {"matchLabels": {"app": app}}, "action": "ALLOW",
                                      "rules": [{"from": [{"source": {"principals": [
                                          f"cluster.local/ns/{ns}/sa/{other}",
                                          f"cluster.local/ns/ns-{(n + 1) % namespaces}/sa/{app}"]}}],
                                                 "to": [{"operation": {"ports": ["8080"]}}]}]}})
                continue
            else:
                objs.append({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta,
                             "spec": {"action": "DENY", "rules": [{"from": [{"source": {
                                 "namespaces": [f"ns-{(n + 5) % namespaces}"]}}]}]}})
                continue
            objs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec})
    return objs


def _edited(obj: dict[str, Any], flip: bool) -> dict[str, Any]:
    """The same policy with one port moved (or moved back)."""
    import copy
    o = copy.deepcopy(obj)
    spec = o["spec"]
    if o["kind"] == "NetworkPolicy":
        rules = spec.get("ingress") or spec.get("egress") or []
        if rules:
            rules[0]["ports"] = [{"port": 8081 if flip else 8080}]
        else:
            spec["policyTypes"] = ["Ingress", "Egress"] if flip else ["Ingress"]
    else:
        rule = (spec.get("rules") or [{}])[0]
        rule["to"] = [{"operation": {"ports": ["8081" if flip else "8080"]}}]
        spec["rules"] = [rule]
    return o


# --- section: compile -----------------------------------------------------------------------------


def section_compile(args: argparse.Namespace, progress: Progress) -> SectionResult:
    progress(f"compile: building {args.pods} pods and {args.policies} policies over {args.namespaces} namespaces "
             f"and {args.nodes} nodes")
    objs = synthetic_cluster(args.pods, args.policies, args.namespaces, args.nodes)
    records: list[Record] = [parse_object(o) for o in objs]
    state = ClusterState()
    options = PolicyOptions(node=NODE)
    compiler = PolicyCompiler(options)
    timings: list[float] = []
    diffs: list[PolicyDiff] = []

    def follow(cs: ChangeSet) -> None:
        t0 = time.perf_counter()
        diffs.append(compiler.on_change(cs))
        timings.append(time.perf_counter() - t0)

    state.subscribe(follow)
    t0 = time.perf_counter()
    state.apply([Event(EventType.ADDED, r) for r in records], synced=True)
    initial = time.perf_counter() - t0
    entries = len(compiler.entries)
    subjects = len(compiler.subjects)
    progress(f"compile: initial sync {initial:.2f} s, {entries} entries for {subjects} local subjects")

    policies = [o for o in objs if o["kind"] in ("NetworkPolicy", "AuthorizationPolicy")]
    rng = random.Random(2)
    # Changes to policies that select pods of this node (others compile to nothing here: too easy).
    local = [o for o in policies if compiler.selected_subjects(parse_object(o).key)]
    pool = local or policies
    incremental: list[float] = []
    writes: list[int] = []
    for i in range(args.changes):
        obj = pool[rng.randrange(len(pool))]
        timings.clear()
        state.apply([Event(EventType.MODIFIED, parse_object(_edited(obj, flip=i % 2 == 0)))])
        state.apply([Event(EventType.MODIFIED, parse_object(obj))])  # and back, so the next change starts equal
        incremental.append(timings[0] if timings else 0.0)
        writes.append(diffs[-2].policy_writes() if len(diffs) >= 2 else 0)
    progress(f"compile: {args.changes} incremental changes, p50 {median(incremental) * 1e3:.2f} ms")
    # A pod of a new identity (new labels) appears as a peer of many subjects, and goes again.
    pod_times: list[float] = []
    for i in range(args.changes):
        n = rng.randrange(args.namespaces)
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"new-{i}", "namespace": f"ns-{n}", "labels": {"app": f"new-{i}", "tier": "fe"}},
               "spec": {"nodeName": f"node-{rng.randrange(args.nodes)}", "serviceAccountName": "new"},
               "status": {"phase": "Running", "podIPs": [{"ip": f"10.127.{i // 256 % 256}.{i % 256}"}]}}
        timings.clear()
        state.apply([Event(EventType.ADDED, parse_object(pod))])
        pod_times.append(timings[0] if timings else 0.0)
        state.apply([Event(EventType.DELETED, parse_object(pod))])
    progress(f"compile: {args.changes} pods of new identities, p50 {median(pod_times) * 1e3:.2f} ms")

    full: list[float] = []
    snapshot = [r for k in (Kind.NAMESPACE, Kind.NETWORK_POLICY, Kind.AUTHORIZATION_POLICY)
                for r in state.records(k).values()]
    workloads = state.workloads()
    for _ in range(args.full_runs):
        t0 = time.perf_counter()
        compile_all(snapshot, workloads, options)
        full.append(time.perf_counter() - t0)
    progress(f"compile: full recompile p50 {median(full):.3f} s")

    base = {"policy_change_seconds_p50": median(full), "policy_change_seconds_p99": percentile(full, 99)}
    cand = {"policy_change_seconds_p50": median(incremental), "policy_change_seconds_p99": percentile(incremental, 99),
            "pod_change_seconds_p50": median(pod_times), "pod_change_seconds_p99": percentile(pod_times, 99)}
    base.update({"pod_change_seconds_p50": base["policy_change_seconds_p50"],
                 "pod_change_seconds_p99": base["policy_change_seconds_p99"]})
    return SectionResult(base, cand, {
        "policies": len(policies), "pods": args.pods, "local_subjects": subjects, "entries": entries,
        "entries_per_policy": round(entries / max(1, len(policies)), 2),
        "entries_per_local_subject": round(entries / max(1, subjects), 1),
        "ipcache_cidrs": len(compiler.ipcache), "writes_per_change_p50": median([float(w) for w in writes]),
        "initial_sync_seconds": round(initial, 3), "changes_measured": len(incremental),
        "full_recompile_runs": len(full),
    })


KERNEL_SECTIONS = {"connect": section_connect, "enforce": section_enforce, "revoke": section_revoke}
SECTIONS = ["compile", *KERNEL_SECTIONS]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench policy")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--pods", type=int, default=5000)
    ap.add_argument("--namespaces", type=int, default=50)
    ap.add_argument("--nodes", type=int, default=50, help="pods are spread over this many nodes; node-0 is measured")
    ap.add_argument("--changes", type=int, default=200, help="policy changes measured (incremental)")
    ap.add_argument("--full-runs", type=int, default=5, help="full recompiles measured (baseline)")
    ap.add_argument("--rounds", type=int, default=2, help="kernel sections: rounds of baseline then candidate")
    ap.add_argument("--batches", type=int, default=10, help="connect: batches per mode and round")
    ap.add_argument("--connects", type=int, default=1000, help="connect: connections per batch")
    ap.add_argument("--enforcements", type=int, default=100, help="enforce: DENY writes (and deletions) timed")
    ap.add_argument("--revoke", type=int, default=1000, help="revoke: connections held, then closed")
    ap.add_argument("--cpu", type=int, default=min(os.sched_getaffinity(0)),
                    help="kernel sections: the CPU the client and server are pinned to")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    chosen = [s for s in args.sections.split(",") if s]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        print(f"bench policy: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if min(args.policies, args.pods, args.namespaces, args.nodes, args.changes, args.full_runs, args.rounds,
           args.batches, args.connects, args.enforcements, args.revoke) < 1:
        print("bench policy: every count (--policies ... --revoke) must be >= 1", file=sys.stderr)
        return 2

    progress = progress_printer(args.json)
    baseline: dict[str, float] = {}
    candidate: dict[str, float] = {}
    extra: dict[str, Any] = {}
    results: dict[str, SectionResult] = {}
    if "compile" in chosen:
        results["compile"] = section_compile(args, progress)
    kernel = [s for s in chosen if s in KERNEL_SECTIONS]
    if kernel:
        with PolicyNode(progress, args) as node:
            for name in kernel:
                results[name] = SectionResult(*KERNEL_SECTIONS[name](node, args))
    for name, res in results.items():
        baseline.update({f"{name}_{k}": v for k, v in res.baseline.items()})
        candidate.update({f"{name}_{k}": v for k, v in res.candidate.items()})
        extra.update({f"{name}_{k}": v for k, v in res.extra.items()})
    ratio = {k: candidate[k] / baseline[k] for k in candidate if baseline.get(k)}
    report("policy", baseline, candidate, ratio, args.json, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
