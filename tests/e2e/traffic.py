"""Self-checking streams between two pods (accel.lab_traffic from the meshaccel image): each side logs
the SHA-256 of all it sent and received per connection; the two sides must agree bit for bit."""

from __future__ import annotations

import json
from typing import Any

from tests.e2e import cluster
from tests.e2e.cluster import MESHACCEL_IMAGE, TEST_NS, kubectl


def traffic_pod(name: str, args: list[str]) -> dict[str, Any]:
    return cluster.pod(name, [{"name": "traffic", "image": MESHACCEL_IMAGE,
                               "command": ["python3", "-m", "accel.lab_traffic", *args]}], labels={"traffic": name})


def start_server(name: str, port: int, conns: int, pause: float = 0.0) -> str:
    cluster.apply(traffic_pod(name, ["serve", "--host", "0.0.0.0", "--port", str(port), "--conns", str(conns),
                                     "--max-size", str(256 << 10), "--pause", str(pause)]))
    cluster.poll(lambda: '"listening"' in kubectl("logs", "-n", TEST_NS, name, check=False).stdout, 120,
                 f"traffic server {name} to listen")
    return str(cluster.get("pod", "-n", TEST_NS, name)["status"]["podIP"])


def start_client(name: str, host: str, port: int, conns: int, msgs: int, pause: float = 0.0) -> None:
    """The client connects once the agent has put both pods in its local endpoint map: a connection
    made before that (a pod's first instant, before its address reached the agent) stays on plain TCP
    for good, by design."""
    args = ["connect", "--host", host, "--port", str(port), "--conns", str(conns), "--msgs", str(msgs),
            "--max-size", str(256 << 10), "--pause", str(pause)]
    gated = ["sh", "-c", 'while [ ! -e /tmp/go ]; do sleep 0.1; done; exec python3 -m accel.lab_traffic "$@"', "sh",
             *args]
    doc = traffic_pod(name, [])
    doc["spec"]["containers"][0]["command"] = gated
    cluster.apply(doc)
    ip = cluster.poll(lambda: cluster.get("pod", "-n", TEST_NS, name)["status"].get("podIP"), 120,
                      f"traffic client {name} to get an address")
    cluster.poll(lambda: {ip, host} <= cluster.local_endpoint_ips(), 60,
                 f"the agent to map {name} ({ip}) and the server ({host}) as local endpoints")
    cluster.poll(lambda: cluster.get("pod", "-n", TEST_NS, name)["status"].get("phase") == "Running", 120,
                 f"traffic client {name} to run")
    cluster.exec_in(name, "touch", "/tmp/go")


def finished(name: str, timeout: float = 300) -> list[dict[str, Any]]:
    """Wait for the pod to end; its per-connection reports (fails if it did not succeed)."""
    phase = cluster.poll(lambda: (lambda p: p if p in ("Succeeded", "Failed") else None)(
        cluster.get("pod", "-n", TEST_NS, name)["status"].get("phase")), timeout, f"traffic pod {name} to finish")
    logs = kubectl("logs", "-n", TEST_NS, name).stdout
    assert phase == "Succeeded", f"traffic pod {name} {phase}:\n{logs[-2000:]}"
    return [r for r in (json.loads(ln) for ln in logs.splitlines() if ln.startswith("{")) if "id" in r]


def assert_bit_exact(client: list[dict[str, Any]], server: list[dict[str, Any]], conns: int) -> int:
    """Both directions of every connection arrived intact; the bytes moved in total."""
    c = {r["id"]: r for r in client}
    s = {r["id"]: r for r in server}
    assert sorted(c) == sorted(s) == list(range(conns)), (sorted(c), sorted(s))
    total = 0
    for i in range(conns):
        assert c[i]["sent_sha256"] == s[i]["recv_sha256"] and c[i]["sent_bytes"] == s[i]["recv_bytes"], (c[i], s[i])
        assert s[i]["sent_sha256"] == c[i]["recv_sha256"] and s[i]["sent_bytes"] == c[i]["recv_bytes"], (c[i], s[i])
        total += c[i]["sent_bytes"] + s[i]["sent_bytes"]
    return total


def delete(*names: str) -> None:
    kubectl("delete", "-n", TEST_NS, *(f"pod/{n}" for n in names), "--wait=false", "--ignore-not-found")
