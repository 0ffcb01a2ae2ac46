"""The kernel sections of `python -m bench policy`: one lab node with the real agent (its eBPF programs and
pinned maps) watching an in-process API server (accel.kubefake). A policy event's time is when the API
server stored it; the kernel's answer is timed by a probe in the client pod. Both read CLOCK_MONOTONIC,
which every process and network namespace share, so the two times compare directly.

The lab pods live in namespace ns-0 of bench.policy's synthetic cluster, so its policies select them:
  pod1 client  app-2 (sa app-2)     pod2 server  app-1, port "http" 8080     pod3  app-3
The API server holds the synthetic cluster's 5,000 pods (all on other nodes) throughout; "policies in
force" = its 1,000 policies stored too (its p1, app-1 from app-2 port 8080, lets the client in), "none in
force" = none of them. The toggled policy is an AuthorizationPolicy DENY of the client's principal
on the server (a DENY wins over every allow, so it bites in both states).

Sections (baseline, candidate; ratio = candidate / baseline):
- connect: connect() latency client -> server (same node, both pinned to one CPU), with 1,000 in force:
  baseline with what the agent wrote for them taken out of the maps, candidate with it put back,
  alternating batch by batch (InForce).
- enforce: API server write of the DENY -> the client's first EACCES (and its deletion -> the first
  success), with none in force vs 1,000 in force. The target is a p99 under 10 ms.
- revoke: 1,000 established connections closed: baseline, the server application closes them itself
  (told on stdin); candidate, the DENY is written and the agent's revoker destroys them (sock_diag).
  Timed until the client has seen the last one end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from accel.kubefake import FakeApiServer
from accel.lab import Lab
from accel.lab_agent import LabAgent, pods_manifest
from bench.common import median, percentile

PORT = 8080
SHAPE: dict[str, Any] = {
    "namespaces": {"pod1": "ns-0", "pod2": "ns-0", "pod3": "ns-0"},
    "namespace_labels": {"ns-0": {"team": "t0", "env": "prod"}},
    "labels": {"pod1": {"app": "app-2", "tier": "db"}, "pod2": {"app": "app-1", "tier": "be"},
               "pod3": {"app": "app-3", "tier": "fe"}},
    "service_accounts": {"pod1": "app-2", "pod2": "app-1", "pod3": "app-3"},
    "ports": {"pod2": [("http", PORT)]},
}
DENY: dict[str, Any] = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "bench-deny-client", "namespace": "ns-0"},
        "spec": {"selector": {"matchLabels": {"app": "app-1"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/ns-0/sa/app-2"]}}],
                            "to": [{"operation": {"ports": [str(PORT)]}}]}]}}

# The server: accepts and closes at once, or after "hold" on stdin keeps every connection it accepts until
# "close" (the application's own way of ending them), answered with how many it closed.
SERVER = r"""
import resource, socket, sys, threading
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
held, lock, holding = [], threading.Lock(), [False]
def serve():
    s = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=4096)
    while True:
        c, _ = s.accept()
        with lock:
            if holding[0]:
                held.append(c)
            else:
                c.close()
threading.Thread(target=serve, daemon=True).start()
print("listening", flush=True)
for line in sys.stdin:
    with lock:
        holding[0] = line.strip() == "hold"
        n = len(held)
        for c in held:
            c.close()
        held.clear()
    print(n, flush=True)
"""

# The client, driven by lines on stdin:
#   "latency HOST N"  N connect()s, each timed, closed with a reset: {"seconds": [...], "errors": k}
#   "hold HOST N"     opens N connections: {"open": N}; then waits until all have ended: {"last_end": t}
#   "reach HOST 1"    one connect(): {"state": "ok" | "EACCES" | "timeout" | ...}
#   "probe HOST 0"    connect()s in a loop, printing {"state": ..., "at": t} on each change, until a line
#                     comes on stdin: {"state": "done"}
CLIENT = r"""
import errno, json, resource, select, socket, struct, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
RESET = struct.pack("ii", 1, 0)
def say(doc):
    print(json.dumps(doc), flush=True)
def attempt(host, port):
    s = socket.socket()
    s.settimeout(1.0)
    try:
        s.connect((host, port))
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, "timeout") if e.errno else "timeout"
    finally:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        s.close()
for line in sys.stdin:
    cmd, host, n = line.split()
    port = int(sys.argv[1])
    if cmd == "latency":
        out, errors = [], 0
        for _ in range(int(n)):
            s = socket.socket()
            t0 = time.perf_counter()
            try:
                s.connect((host, port))
                out.append(time.perf_counter() - t0)
            except OSError:
                errors += 1
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            s.close()
        say({"seconds": out, "errors": errors})
    elif cmd == "hold":
        socks = [socket.create_connection((host, port), timeout=5) for _ in range(int(n))]
        poll, by_fd = select.poll(), {s.fileno(): s for s in socks}
        for fd in by_fd:
            poll.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        say({"open": len(socks)})
        last = 0.0
        while by_fd:
            for fd, _ in poll.poll(10000):
                s = by_fd.pop(fd)
                try:
                    if s.recv(1):
                        continue  # the server never sends; treat bytes as the end too
                except OSError:
                    pass
                last = time.monotonic()
                poll.unregister(fd)
                s.close()
        say({"last_end": last})
    elif cmd == "reach":
        say({"state": attempt(host, port)})
    elif cmd == "probe":
        state = None
        while not select.select([sys.stdin], [], [], 0)[0]:
            now = attempt(host, port)
            if now != state:
                state = now
                say({"state": now, "at": time.monotonic()})
            time.sleep(0.001)  # ~1,000 connections a second: a busy pod, and a 1 ms resolution
        sys.stdin.readline()
        say({"state": "done", "at": time.monotonic()})
"""


class PolicyNode:
    """The lab node, its agent on the fake API server, the client and server processes. A context manager."""

    def __init__(self, progress: Any, args: argparse.Namespace) -> None:
        from bench.policy import synthetic_cluster

        self.progress = progress
        self.args = args
        self.stack = contextlib.ExitStack()
        self.tmp = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="meshaccel-bench-policy-")))
        everything = synthetic_cluster(args.pods, args.policies, args.namespaces, args.nodes)
        self.cluster = [o for o in everything if o["kind"] in ("Namespace", "Pod")]
        self.in_force = [o for o in everything if o["kind"] not in ("Namespace", "Pod")]
        self.policies_on = False

    def __enter__(self) -> PolicyNode:
        try:
            self._up()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def _up(self) -> None:
        import yaml

        self.api = self.stack.enter_context(FakeApiServer())
        self.api.apply_many(self.cluster)
        self.lab = Lab(3)
        self.stack.callback(self.lab.down)
        self.lab.up()
        self.api.apply_many(d for d in yaml.safe_load_all(pods_manifest(self.lab, **SHAPE)) if d)
        self.agent = LabAgent(self.lab, kubeconfig=self.api.write_kubeconfig(self.tmp / "kubeconfig"))
        self.stack.callback(self.agent.down)
        self.progress("policy: starting the lab node's agent on the in-process API server")
        self.agent.up()
        cpu = self.args.cpu
        self.server = self._spawn("pod2", SERVER, cpu)
        assert self.server.stdout is not None
        if self.server.stdout.readline().strip() != "listening":
            raise RuntimeError("the bench server in pod2 did not start")
        self.client = self._spawn("pod1", CLIENT, cpu)
        self.server_ip = self.lab.pod("pod2").ipv4

    def _spawn(self, pod: str, script: str, cpu: int) -> subprocess.Popen[str]:
        proc = self.lab.popen(pod, ["taskset", "-c", str(cpu), sys.executable, "-c", script, str(PORT)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def end() -> None:
            proc.kill()
            proc.wait()
        self.stack.callback(end)
        return proc

    # --- talking to the pods ------------------------------------------------------------------------
    def ask(self, proc: subprocess.Popen[str], line: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()

    def answer(self, proc: subprocess.Popen[str]) -> Any:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a bench process in the lab exited (code {proc.wait()})")
        return json.loads(line)

    # --- the cluster's state ------------------------------------------------------------------------
    def set_policies(self, on: bool) -> None:
        """Store (or delete) the synthetic cluster's policies, then wait until the kernel shows it:
        the policy map's size settles and the client reaches the server."""
        if on == self.policies_on:
            return
        t0 = time.monotonic()
        if on:
            self.api.apply_many(self.in_force)
        else:
            for o in self.in_force:
                self.api.delete(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"])
        self.policies_on = on
        self._settle()
        self.progress(f"policy: {'1,000 policies' if on else 'no policies'} in force "
                      f"({self.entries()} policy map entries), {time.monotonic() - t0:.1f} s")

    def _settle(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        last, stable_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.entries()
            if n != last:
                last, stable_since = n, time.monotonic()
            elif (time.monotonic() - stable_since > 1.0 and self.agent.status().get("lag_seconds", 0) < 0.5
                  and self.reach() == "ok"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the agent did not settle within {timeout:.0f} s (policy entries {last}, "
                           f"client -> server {self.reach()})")

    def entries(self) -> int:
        from sockops_bpf import loader
        from sockops_bpf.maps import open_policy

        with open_policy(loader.pin_dir(self.lab.node("node1").instance)) as maps:
            return len(maps.policy)

    def server_close(self, hold: bool = False) -> int:
        """The server application closes every connection it holds (how many), and from now on holds
        the ones it accepts (`hold`) or closes them at once."""
        self.ask(self.server, "hold" if hold else "close")
        assert self.server.stdout is not None
        return int(self.server.stdout.readline().strip() or -1)

    def reach(self) -> str:
        self.ask(self.client, f"reach {self.server_ip} 1")
        return str(self.answer(self.client)["state"])

    def revoked(self) -> float:
        with urllib.request.urlopen(self.agent.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("meshaccel_policy_revoked_connections_total "):
                return float(line.split()[1])
        return 0.0


# --- sections -------------------------------------------------------------------------------------------


def connect_latency(node: PolicyNode, batches: int, per_batch: int) -> tuple[list[float], int]:
    """Median connect() time of each batch, and the failures."""
    medians, errors = [], 0
    for _ in range(batches):
        node.ask(node.client, f"latency {node.server_ip} {per_batch}")
        doc = node.answer(node.client)
        medians.append(median(doc["seconds"]))
        errors += int(doc["errors"])
    return medians, errors


class InForce:
    """What the agent wrote for the policies (policy map, and the ipcache's CIDR entries), taken out of the
    kernel and put back from the bench: connect() can then be timed with and without them batch by batch
    (machine drift falls on both alike). The agent sees no event meanwhile, so it neither writes nor
    revokes; `restore()` leaves the maps as it wrote them."""

    def __init__(self, node: PolicyNode) -> None:
        from accel.policy_agent import owned_by_policy
        from sockops_bpf import loader
        from sockops_bpf.maps import open_mesh, open_policy

        pins = loader.pin_dir(node.lab.node("node1").instance)
        self.policy_maps, self.mesh = open_policy(pins), open_mesh(pins)
        self.entries = dict(self.policy_maps.policy.items())
        self.cidrs = {c: i for c, i in self.mesh.ipcache.items() if owned_by_policy(i)}

    def set(self, on: bool) -> None:
        if on:
            for c, i in self.cidrs.items():
                self.mesh.ipcache[c] = i
            for k, v in self.entries.items():
                self.policy_maps.policy[k] = v
        else:
            for k in self.entries:
                self.policy_maps.policy.pop(k, None)
            for c in self.cidrs:
                self.mesh.ipcache.pop(c, None)

    def restore(self) -> None:
        self.set(True)
        self.policy_maps.close()
        self.mesh.close()


def section_connect(node: PolicyNode, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float],
                                                                         dict[str, Any]]:
    node.set_policies(True)
    kernel = InForce(node)
    if not kernel.entries:
        raise RuntimeError("the agent wrote no policy entries for the lab pods")
    by_mode: dict[bool, list[float]] = {False: [], True: []}
    errors = 0
    try:
        node.ask(node.client, f"latency {node.server_ip} 500")  # warm up
        node.answer(node.client)
        for b in range(args.rounds * args.batches):
            for on in ((False, True) if b % 2 == 0 else (True, False)):
                kernel.set(on)
                meds, errs = connect_latency(node, 1, args.connects)
                by_mode[on] += meds
                errors += errs
            if (b + 1) % args.batches == 0:
                node.progress(f"connect: {b + 1} batches, p50 without {median(by_mode[False]) * 1e6:.1f} us, "
                              f"with {median(by_mode[True]) * 1e6:.1f} us")
    finally:
        kernel.restore()
    ratios = [c / b for b, c in zip(by_mode[False], by_mode[True], strict=True)]
    base = {"connect_seconds_p50": median(by_mode[False])}
    cand = {"connect_seconds_p50": median(by_mode[True])}
    return base, cand, {"connect_p50_ratio_median_of_pairs": round(median(ratios), 4), "connect_failures": errors,
                        "connects_per_mode": args.rounds * args.batches * args.connects,
                        "policy_entries_in_force": len(kernel.entries), "policy_cidrs_in_force": len(kernel.cidrs)}


def toggle_times(node: PolicyNode, times: int) -> tuple[list[float], list[float]]:
    """Seconds from the API server's write of the DENY to the client's first EACCES, and from its deletion
    to the first success, `times` times."""
    deny, allow = [], []
    node.ask(node.client, f"probe {node.server_ip} 0")
    if node.answer(node.client)["state"] != "ok":
        raise RuntimeError("the client does not reach the server before the DENY")
    for _ in range(times):
        time.sleep(0.05)
        t0 = time.monotonic()
        node.api.apply(DENY)
        ev = node.answer(node.client)
        if ev["state"] != "EACCES":
            raise RuntimeError(f"after the DENY the client saw {ev['state']!r}, not EACCES")
        deny.append(ev["at"] - t0)
        time.sleep(0.05)
        t0 = time.monotonic()
        node.api.delete("AuthorizationPolicy", "ns-0", DENY["metadata"]["name"])
        ev = node.answer(node.client)
        if ev["state"] != "ok":
            raise RuntimeError(f"after the DENY went the client saw {ev['state']!r}, not a connection")
        allow.append(ev["at"] - t0)
    node.ask(node.client, "stop")
    while node.answer(node.client)["state"] != "done":
        pass
    return deny, allow


def section_enforce(node: PolicyNode, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float],
                                                                         dict[str, Any]]:
    out: dict[bool, dict[str, float]] = {}
    for on in (False, True):
        node.set_policies(on)
        deny, allow = toggle_times(node, args.enforcements)
        out[on] = {"deny_enforced_seconds_p50": median(deny), "deny_enforced_seconds_p99": percentile(deny, 99),
                   "allow_enforced_seconds_p50": median(allow), "allow_enforced_seconds_p99": percentile(allow, 99)}
        node.progress(f"enforce: {'1,000' if on else 'no'} policies: deny p50 {median(deny) * 1e3:.2f} ms "
                      f"p99 {percentile(deny, 99) * 1e3:.2f} ms")
    return out[False], out[True], {"enforcements_measured": args.enforcements}


def hold(node: PolicyNode, n: int) -> None:
    node.server_close(hold=True)
    node.ask(node.client, f"hold {node.server_ip} {n}")
    doc = node.answer(node.client)
    if doc.get("open") != n:
        raise RuntimeError(f"the client opened {doc} connections, not {n}")


def section_revoke(node: PolicyNode, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float],
                                                                       dict[str, Any]]:
    node.set_policies(True)
    n = args.revoke
    app, policy = [], []
    revoked_before = node.revoked()
    for r in range(args.rounds):
        hold(node, n)
        time.sleep(0.5)  # every connection accepted and spliced
        t0 = time.monotonic()
        if node.server_close() != n:
            raise RuntimeError("the server did not hold every connection")
        app.append(node.answer(node.client)["last_end"] - t0)

        hold(node, n)
        time.sleep(0.5)
        t0 = time.monotonic()
        node.api.apply(DENY)
        policy.append(node.answer(node.client)["last_end"] - t0)
        node.api.delete("AuthorizationPolicy", "ns-0", DENY["metadata"]["name"])
        node.server_close()  # forget the server's ends (already destroyed)
        deadline = time.monotonic() + 30
        while node.reach() != "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
        node.progress(f"revoke: round {r + 1}: application {app[-1] * 1e3:.1f} ms, policy {policy[-1] * 1e3:.1f} ms")
    return ({"close_connections_seconds": median(app)}, {"close_connections_seconds": median(policy)},
            {"connections_revoked_by_agent": node.revoked() - revoked_before, "connections_per_round": n})
