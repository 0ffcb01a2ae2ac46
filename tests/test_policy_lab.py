"""Identity policy enforced by the real programs and agents of a two-node lab, each case with an allowed
and a denied connection: same node (decided at connect(): EACCES at once), plaintext across nodes
(decided by the receiving node's ingress hook: the SYN is dropped) and through the mTLS tunnel (the
receiving Envoy's RBAC answers 401; the application behind it never sees the connection).

  node1: pod1 lab/web (strict)    pod3 lab/api              pod5 team-b/client (strict)
  node2: pod2 lab/db  (strict)    pod4 lab/api              pod6 team-b/client
Namespaces: lab (team=a), team-b (team=b). pod2 names its port 8080 "http". Servers listen on pod2, pod3
and pod4, ports 8080 and 9090.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from accel.lab import Lab
from accel.lab_agent import LabCluster
from tests import waiting
from tests.conftest import leftovers, require_lab_with_envoy
from tests.mesh_helpers import ClusterLab, ask

pytestmark = [pytest.mark.lab, pytest.mark.envoy, pytest.mark.slow]

SHAPE: dict[str, Any] = {
    "namespaces": {"pod5": "team-b", "pod6": "team-b"},
    "namespace_labels": {"lab": {"team": "a"}, "team-b": {"team": "b"}},
    "labels": {"pod1": {"role": "web"}, "pod2": {"role": "db"}, "pod3": {"role": "api"}, "pod4": {"role": "api"},
               "pod5": {"role": "client"}, "pod6": {"role": "client"}},
    "annotations": {p: {"meshaccel.io/mtls": "strict"} for p in ("pod1", "pod2", "pod5")},
    "ports": {"pod2": [("http", 8080)]},
}

# Answers with its own name and the client's address; records every connection it accepted.
SERVER = r"""
import socket, sys, threading
name, log = sys.argv[1], open(sys.argv[2], "a", buffering=1)
def serve(port):
    s = socket.create_server(("0.0.0.0", port))
    while True:
        c, peer = s.accept()
        log.write(f"{port} {peer[0]}\n")
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def handle(c):
    with c, c.makefile("rb") as lines:
        for line in lines:
            c.sendall(b"echo " + line.strip() + b"\n")
for port in (8080, 9090):
    threading.Thread(target=serve, args=(port,), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""


class PolicyLab(ClusterLab):
    def accepted(self, pod: str) -> list[str]:
        path = self.logs / f"{pod}.log"
        return path.read_text().splitlines() if path.exists() else []

    def reach(self, src: str, dst: str, port: int = 8080, timeout: float = 1.5) -> str:
        """'ok', or how it failed: EACCES (denied at connect), timeout (dropped), closed (the tunnel refused)."""
        out = ask(self.lab, src, dst if "." in dst or ":" in dst else self.ip(dst), port, f"{src}-{port}", timeout)
        if out.startswith("echo"):
            return "ok"
        if "PermissionError" in out:
            return "EACCES"
        if "TimeoutError" in out:
            return "timeout"
        return "closed"

    def apply(self, name: str, *docs: dict[str, Any]) -> None:
        (self.cluster.manifests / f"policy-{name}.yaml").write_text(yaml.safe_dump_all(docs))

    def remove(self, name: str) -> None:
        (self.cluster.manifests / f"policy-{name}.yaml").unlink(missing_ok=True)

    def until(self, src: str, dst: str, want: str, port: int = 8080, timeout: float = 20) -> None:
        last = ""

        def check() -> bool:
            nonlocal last
            last = self.reach(src, dst, port)
            return last == want
        waiting.wait_until(check, timeout, f"{src} -> {dst}:{port} {want} (last: {last})")


@pytest.fixture(scope="module")
def plab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyLab]:
    require_lab_with_envoy()
    logs = tmp_path_factory.mktemp("policy-lab")
    lab = Lab(6, nodes=2)
    lab.up()
    cluster = LabCluster(lab, envoy=True, certs=True)
    pl = PolicyLab(lab, cluster, logs)
    try:
        cluster.up()
        cluster.set_pods(**SHAPE)
        for pod in ("pod2", "pod3", "pod4"):
            s = lab.popen(pod, [sys.executable, "-c", SERVER, pod, str(logs / f"{pod}.log")], stdout=subprocess.PIPE,
                          text=True)
            assert s.stdout is not None and s.stdout.readline().strip() == "listening"
            pl.procs.append(s)
        waiting.wait_until(lambda: "lab/pod1" in cluster.agents["node1"].status()["capture_ready"]
                           and "lab/pod2" in cluster.agents["node2"].status()["capture_ready"], 60, "tunnels up")
        pl.until("pod1", "pod2", "ok")
        yield pl
    finally:
        pl.down()
    assert leftovers(lab.id) == []


def netpol(name: str, namespace: str, selector: dict[str, str], ingress: list[Any] | None = None,
           egress: list[Any] | None = None, types: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": {"matchLabels": selector}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    spec["policyTypes"] = types or (["Ingress"] if egress is None else ["Egress"])
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def authz(name: str, namespace: str, selector: dict[str, str], action: str, rules: list[Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": selector}, "action": action, "rules": rules}}


def test_default_deny_ingress(plab: PolicyLab) -> None:
    plab.apply("deny", netpol("db-deny-all", "lab", {"role": "db"}, ingress=[]))
    try:
        plab.until("pod4", "pod2", "EACCES")  # same node: refused at connect()
        assert plab.reach("pod4", "pod4") == "ok"  # a pod the policy does not select
        assert plab.reach("pod6", "pod2") == "EACCES"
    finally:
        plab.remove("deny")
    plab.until("pod4", "pod2", "ok")


def test_allow_from_namespace_pod_selector_and_both(plab: PolicyLab) -> None:
    cases = {
        "namespace": ([{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}], "pod6", "pod4"),
        "pods": ([{"from": [{"podSelector": {"matchLabels": {"role": "api"}}}]}], "pod4", "pod6"),
        "both": ([{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}},
                             "podSelector": {"matchLabels": {"role": "client"}}}]}], "pod6", "pod4"),
    }
    for name, (ingress, allowed, denied) in cases.items():
        plab.apply(name, netpol(f"db-{name}", "lab", {"role": "db"}, ingress=ingress))
        try:
            plab.until(denied, "pod2", "EACCES")
            assert plab.reach(allowed, "pod2") == "ok", name
        finally:
            plab.remove(name)
        plab.until(denied, "pod2", "ok")


def test_cross_node_plaintext_is_decided_by_the_receiving_node(plab: PolicyLab) -> None:
    plab.apply("api-from-web", netpol("api-from-web", "lab", {"role": "api"},
                                      ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "web"}}}]}]))
    try:
        plab.until("pod3", "pod4", "timeout")  # pod3 (api, node1) -> pod4 (node2): the SYN is dropped there
        before = len(plab.accepted("pod4"))
        assert plab.reach("pod3", "pod4") == "timeout"
        assert plab.reach("pod1", "pod4") == "ok"  # web (node1) is allowed
        assert [line.split()[1] for line in plab.accepted("pod4")[before:]] == [plab.ip("pod1")]  # pod3 never got in
    finally:
        plab.remove("api-from-web")
    plab.until("pod3", "pod4", "ok")


def test_egress_deny_and_ip_block_with_except(plab: PolicyLab) -> None:
    lab = plab.lab
    # Two addresses that are no pod: the nodes' ends of the link between them (world to the policy).
    n1, n2 = lab.node("node1").fabric4, lab.node("node2").fabric4
    servers = [subprocess.Popen(lab.node_command([sys.executable, "-c", SERVER, name, str(plab.logs / f"{name}.log")],
                                                 node=node), stdout=subprocess.PIPE, text=True)
               for name, node in (("n1", "node1"), ("n2", "node2"))]
    try:
        for s in servers:
            assert s.stdout is not None and s.stdout.readline().strip() == "listening"
        plab.apply("egress", netpol("api-egress", "lab", {"role": "api"}, egress=[
            {"to": [{"podSelector": {"matchLabels": {"role": "api"}}}]},
            {"to": [{"ipBlock": {"cidr": "10.211.254.0/24", "except": [f"{n1}/32"]}}]}]))
        plab.until("pod4", "pod2", "EACCES")  # egress: db is not api
        assert plab.reach("pod4", "pod3") == "ok"  # egress to api (node1)
        assert plab.reach("pod4", n2) == "ok"  # inside the block
        assert plab.reach("pod4", n1) == "EACCES"  # the except
    finally:
        plab.remove("egress")
        for s in servers:
            s.kill()
            s.wait()
    plab.until("pod4", "pod2", "ok")


def test_named_port_and_port_range(plab: PolicyLab) -> None:
    for name, ports in (("named", [{"port": "http"}]), ("range", [{"port": 8000, "endPort": 8100}])):
        plab.apply(name, netpol(f"db-{name}", "lab", {"role": "db"}, ingress=[{"ports": ports}]))
        try:
            plab.until("pod4", "pod2", "EACCES", port=9090)
            assert plab.reach("pod4", "pod2", 8080) == "ok", name
        finally:
            plab.remove(name)
        plab.until("pod4", "pod2", "ok", port=9090)


def test_policy_applies_to_a_clusterips_backend(plab: PolicyLab) -> None:
    vip = "10.96.7.70"
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "lab"},
           "spec": {"clusterIP": vip, "selector": {"role": "db"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "db-1", "namespace": "lab", "labels": {"kubernetes.io/service-name": "db"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": [{"addresses": [plab.ip("pod2")], "conditions": {"ready": True}}]}
    (plab.cluster.manifests / "svc-db.yaml").write_text(yaml.safe_dump_all([svc, eps]))
    plab.apply("vip", netpol("db-from-b", "lab", {"role": "db"},
                             ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]))
    try:
        plab.until("pod4", vip, "EACCES", port=80)  # the backend's policy, after load balancing
        assert plab.reach("pod6", vip, 80) == "ok"
    finally:
        plab.remove("vip")
        (plab.cluster.manifests / "svc-db.yaml").unlink()
    plab.until("pod4", "pod2", "ok")


def test_authorization_policy_by_principal_and_namespace_same_node_and_through_the_tunnel(plab: PolicyLab) -> None:
    lab = plab.lab
    # DENY by principal: pod4's service account, on the same node.
    plab.apply("deny-principal", authz("db-deny-api", "lab", {"role": "db"}, "DENY",
                                       [{"from": [{"source": {"principals": ["cluster.local/ns/lab/sa/pod4"]}}]}]))
    try:
        plab.until("pod4", "pod2", "EACCES")
        assert plab.reach("pod6", "pod2") == "ok"
    finally:
        plab.remove("deny-principal")
    plab.until("pod4", "pod2", "ok")
    # ALLOW by namespace: only team-b; through the tunnel pod1 (lab) is refused with 401 by node2's Envoy,
    # pod5 (team-b) is let through; pod2's server never sees pod1's attempt.
    plab.apply("allow-ns", authz("db-allow-b", "lab", {"role": "db"}, "ALLOW",
                                 [{"from": [{"source": {"namespaces": ["team-b"]}}]}]))
    try:
        plab.until("pod4", "pod2", "EACCES")  # same node, lab
        before = len(plab.accepted("pod2"))
        plab.until("pod1", "pod2", "closed")  # tunnel, lab: refused by RBAC
        assert plab.reach("pod5", "pod2") == "ok"  # tunnel, team-b
        assert plab.reach("pod6", "pod2") == "ok"  # same node, team-b
        node2_ip = lab.node("node2").ipv4  # the node Envoy delivers tunnels from the node's address
        seen = plab.accepted("pod2")[before:]
        assert len([s for s in seen if s.endswith(node2_ip)]) == 1 and not any(s.endswith(plab.ip("pod1")) for s in seen)

        def refused_on_the_wire() -> bool:
            flows = flows_of(plab.agent("node2").url)
            return any(f["path"] == "tunnel" and f["verdict"] == "denied" and f["reason"] == "policy"
                       and f["http_status"] == 401 and f["src"]["identity"].endswith("/sa/pod1") for f in flows)
        waiting.wait_until(refused_on_the_wire, 15, "the 401 in node2's flows")
    finally:
        plab.remove("allow-ns")
    plab.until("pod1", "pod2", "ok")


def flows_of(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url + "/flows", timeout=5) as r:
        return [json.loads(ln) for ln in r.read().decode().splitlines() if ln.strip()]


KEEPER = r"""
import socket, sys, time
port = int(sys.argv[3]) if len(sys.argv) > 3 else 8080
conns = [socket.create_connection((sys.argv[1], port), timeout=5) for _ in range(int(sys.argv[2]))]
print("open", flush=True)
for line in sys.stdin:  # "probe": one round trip on every connection, report which are still alive
    alive = []
    for i, c in enumerate(conns):
        try:
            c.sendall(b"ping\n")
            alive.append(i if c.recv(64).startswith(b"echo") else -1)
        except OSError:
            alive.append(-1)
    print(" ".join(map(str, alive)), flush=True)
"""


def test_revocation_closes_what_is_no_longer_allowed_within_a_second(plab: PolicyLab) -> None:
    from tests import traffic

    lab, db = plab.lab, plab.ip("pod2")
    # 20 to be revoked: 10 spliced on node2 (pod4, lab) and 10 tunnelled from node1 (pod1, lab).
    doomed = [lab.popen(src, [sys.executable, "-c", KEEPER, db, "10"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        text=True) for src in ("pod4", "pod1")]
    # 20 that stay allowed and keep moving bytes: pod6 (team-b, node2, spliced), pod5 (team-b, tunnel).
    kept = [traffic.start(lab, "pod2", src, db, 7400 + i, conns=10, msgs=60, max_size=128 << 10, pause=0.05)
            for i, src in enumerate(("pod6", "pod5"))]
    try:
        for d in doomed:
            assert d.stdout is not None and d.stdout.readline().strip() == "open"
        plab.apply("revoke", netpol("db-only-b", "lab", {"role": "db"},
                                    ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]))
        t0 = time.monotonic()

        def all_closed() -> bool:
            states = []
            for d in doomed:
                assert d.stdin is not None and d.stdout is not None
                d.stdin.write("probe\n")
                d.stdin.flush()
                states += d.stdout.readline().split()
            return all(s == "-1" for s in states)
        waiting.wait_until(all_closed, 10, "the 20 denied connections closed", interval=0.05)
        took = time.monotonic() - t0
        print(f"revocation: 20 connections closed {took:.3f}s after the policy file was written")
        assert took < 3.0  # includes the folder source's poll; the agent's own part is in its log and bench
        assert plab.reach("pod4", "pod2") == "EACCES"  # new ones refused: at connect() on node2,
        plab.until("pod1", "pod2", "closed", timeout=10)  # and by RBAC once node2's Envoy has the new listener
        for t in kept:
            traffic.finish(t, 10, timeout=120)  # the allowed ones: untouched, every byte
    finally:
        plab.remove("revoke")
        for d in doomed:
            d.kill()
            d.wait()
    plab.until("pod4", "pod2", "ok")



# An IPv6 server that takes IPv4 too (what Go, Java and Node listen with by default): its IPv4
# connections are IPv6 sockets with IPv4-mapped addresses.
DUAL_STACK_SERVER = r"""
import socket, threading
s = socket.create_server(("::", 9191), family=socket.AF_INET6, dualstack_ipv6=True)
print("listening", flush=True)
def handle(c):
    with c, c.makefile("rb") as lines:
        for line in lines:
            c.sendall(b"echo " + line.strip() + b"\n")
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""


def test_revocation_judges_ipv4_mapped_sockets_by_their_ipv4_peer(plab: PolicyLab) -> None:
    """A dual-stack server's IPv4 connections (and an IPv6 client socket dialling an IPv4-mapped address)
    are judged by the pod behind the IPv4 address: the allowed ones stay, the denied ones close."""
    lab, db = plab.lab, plab.ip("pod2")
    server = lab.popen("pod2", [sys.executable, "-c", DUAL_STACK_SERVER], stdout=subprocess.PIPE, text=True)
    keepers = {}
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        # pod6 (team-b, allowed after the change): IPv4 and an IPv6 socket to the mapped address; pod4 (lab): denied.
        for name, src, ip in (("v4", "pod6", db), ("mapped", "pod6", f"::ffff:{db}"), ("denied", "pod4", db)):
            keepers[name] = lab.popen(src, [sys.executable, "-c", KEEPER, ip, "3", "9191"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)

        def probe(name: str) -> list[str]:
            k = keepers[name]
            assert k.stdin is not None and k.stdout is not None
            k.stdin.write("probe\n")
            k.stdin.flush()
            return k.stdout.readline().split()
        for name, k in keepers.items():
            assert k.stdout is not None and k.stdout.readline().strip() == "open", name
            assert probe(name) == ["0", "1", "2"], name
        plab.apply("mapped", netpol("db-only-b", "lab", {"role": "db"},
                                    ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]))
        waiting.wait_until(lambda: probe("denied") == ["-1", "-1", "-1"], 10, "pod4's connections closed")
        time.sleep(1.0)  # a later round would close wrongly judged ones too
        assert probe("v4") == ["0", "1", "2"] and probe("mapped") == ["0", "1", "2"]
    finally:
        plab.remove("mapped")
        for k in [server, *keepers.values()]:
            k.kill()
            k.wait()
    plab.until("pod4", "pod2", "ok")

def test_the_destination_node_revokes_tunnels_when_the_source_node_cannot(plab: PolicyLab) -> None:
    """node1's agent is frozen (as if down, or the peer were an Istio proxy with no meshaccel agent): node2
    closes the tunnelled connections its new policy denies by itself, from the streams' peer principals
    in its Envoy's access log, and leaves the allowed tunnelled ones alone."""
    from tests import traffic

    lab, db = plab.lab, plab.ip("pod2")
    node2 = plab.agent("node2")
    st = node2.status()
    before, closed_before = st["flows"]["inbound_tunnels"]["opened"], st["revocation"]["closed"]
    doomed = lab.popen("pod1", [sys.executable, "-c", KEEPER, db, "10"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       text=True)
    kept = traffic.start(lab, "pod2", "pod5", db, 7500, conns=10, msgs=60, max_size=128 << 10, pause=0.05)
    frozen = plab.agent("node1").pid("agent")
    assert frozen is not None
    try:
        assert doomed.stdout is not None and doomed.stdout.readline().strip() == "open"
        waiting.wait_until(lambda: node2.status()["flows"]["inbound_tunnels"]["opened"] >= before + 10, 15,
                           "node2's Envoy logged the 10 tunnelled streams")
        os.kill(frozen, signal.SIGSTOP)
        plab.apply("revoke-at-destination", netpol("db-only-b", "lab", {"role": "db"},
                                                   ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]))
        t0 = time.monotonic()

        def all_closed() -> bool:
            assert doomed.stdin is not None and doomed.stdout is not None
            doomed.stdin.write("probe\n")
            doomed.stdin.flush()
            return all(s == "-1" for s in doomed.stdout.readline().split())
        try:
            waiting.wait_until(all_closed, 10, "the 10 denied tunnelled connections closed by node2", interval=0.05)
        except AssertionError as e:
            st = node2.status()
            raise AssertionError(f"{e}; node2: inbound tunnels {st['flows']['inbound_tunnels']}, "
                                 f"revocation {st['revocation']}") from None
        print(f"revocation at the destination: 10 tunnelled connections closed {time.monotonic() - t0:.3f}s after "
              "the policy file was written")
        traffic.finish(kept, 10, timeout=120)  # pod5 (team-b) through the same tunnels' Envoys: every byte
        assert node2.status()["revocation"]["closed"] >= closed_before + 10
    finally:
        os.kill(frozen, signal.SIGCONT)
        plab.remove("revoke-at-destination")
        doomed.kill()
        doomed.wait()
    plab.until("pod1", "pod2", "ok")

def test_policy_check_explains_with_the_kernel_maps_and_denies_are_counted(plab: PolicyLab) -> None:
    plab.apply("check", netpol("db-from-b", "lab", {"role": "db"},
                               ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]))
    try:
        plab.until("pod4", "pod2", "EACCES")
        url = plab.agent("node2").url

        def check(src: str, dst: str) -> tuple[int, str]:
            out = subprocess.run([sys.executable, "-m", "accel.cli", "policy", "check", src, dst, "8080", "--agent", url],
                                 capture_output=True, text=True, timeout=30)
            return out.returncode, out.stdout.strip()
        code, text = check("lab/pod4", "lab/pod2")
        assert code == 1 and text.startswith("DENY") and "NetworkPolicy lab/db-from-b" in text, text
        code, text = check("team-b/pod6", plab.ip("pod2"))
        assert code == 0 and text.startswith("ALLOW") and "db-from-b ingress[0]" in text, text
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        line = next(ln for ln in metrics.splitlines()
                    if ln.startswith("meshaccel_policy_denied_total{") and "db-from-b" in ln)
        assert float(line.rsplit(" ", 1)[1]) >= 1, line
    finally:
        plab.remove("check")
    plab.until("pod4", "pod2", "ok")


def test_bad_policies_are_reported_and_open_nothing(plab: PolicyLab) -> None:
    good = netpol("db-from-b", "lab", {"role": "db"},
                  ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}])
    unknown_field = netpol("db-typo", "lab", {"role": "db"}, ingress=[{"form": [{"podSelector": {}}]}])
    bad_cidr = netpol("db-cidr", "lab", {"role": "db"}, ingress=[{"from": [{"ipBlock": {"cidr": "10.0.0.0/99"}}]}])
    no_port = netpol("db-port", "lab", {"role": "api"}, ingress=[{"ports": [{"port": "nope"}]}])
    l7_only = authz("db-l7", "lab", {"role": "web"}, "ALLOW", [{"to": [{"operation": {"methods": ["GET"]}}]}])
    plab.apply("bad", good, unknown_field, bad_cidr, no_port, l7_only)
    try:
        plab.until("pod4", "pod2", "EACCES")  # the good one is enforced
        assert plab.reach("pod6", "pod2") == "ok"
        plab.until("pod6", "pod4", "EACCES")  # no port named "nope": api admits nothing, nothing opened up
        log = (plab.agent("node2").dir / "agent.log").read_text()
        for name in ("db-typo", "db-cidr", "db-port"):
            assert name in log, name
        assert "db-l7" in log
        metrics = urllib.request.urlopen(plab.agent("node2").url + "/metrics", timeout=5).read().decode()
        assert "meshaccel_bad_input_total" in metrics
    finally:
        plab.remove("bad")
    plab.until("pod4", "pod2", "ok")
    plab.until("pod6", "pod4", "ok")
