"""Driving the e2e node: kubectl, the Python client, pods to run commands in, host-side BPF checks.

The node is `scripts/e2e/node.py` (started and stopped by the `node` fixture); its fixed addresses and
paths are repeated here, overridable by the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.waiting import wait_until

__all__ = ["wait_until"]

REPO = Path(__file__).resolve().parents[2]
KUBECONFIG = os.environ.get("MESHACCEL_E2E_KUBECONFIG", "/var/lib/meshaccel-e2e/admin.kubeconfig")
BIN = Path(os.environ.get("MESHACCEL_E2E_BIN", "/var/cache/meshaccel/e2e/bin"))
NODE = os.environ.get("MESHACCEL_E2E_NODE", "e2e-node")
NODE_IP = os.environ.get("MESHACCEL_E2E_NODE_IP", "10.254.0.1")
API_PORT = int(os.environ.get("MESHACCEL_E2E_API_PORT", "6443"))
SYSTEM_NS = "meshaccel-system"
TEST_NS = "e2e"
APP_IMAGE = "localhost/meshaccel-e2e-app:1"  # busybox: httpd, nc, wget
MESHACCEL_IMAGE = "meshaccel:0.1.0"  # python3 and accel.lab_traffic for self-checking streams
PIN_ROOT = Path("/sys/fs/bpf/meshaccel")
NODE_PY = REPO / "scripts" / "e2e" / "node.py"


def node_py(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """scripts/e2e/node.py with this interpreter (it needs `cryptography` from the venv)."""
    import sys

    return subprocess.run([sys.executable, str(NODE_PY), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def kubectl(*args: str, input: str | None = None, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(BIN / "kubectl"), f"--kubeconfig={KUBECONFIG}", *args], input=input,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-1500:]}")
    return p


def get(*args: str) -> Any:
    return json.loads(kubectl("get", "-o", "json", *args).stdout)


def apply(*docs: dict[str, Any]) -> None:
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))


def api_client() -> Any:
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=KUBECONFIG, client_configuration=cfg)
    return client.ApiClient(cfg)


def exec_in(pod: str, *cmd: str, ns: str = TEST_NS, container: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    c = ["-c", container] if container else []
    return kubectl("exec", "-n", ns, pod, *c, "--", *cmd, check=check, timeout=timeout)


def agent_pod() -> dict[str, Any]:
    pods = get("pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/name=meshaccel-agent")["items"]
    assert len(pods) == 1, f"expected one agent pod on the single node, found {[p['metadata']['name'] for p in pods]}"
    return pods[0]


def ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions", [])
    return pod["metadata"].get("deletionTimestamp") is None and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conds)


def wait_pods_ready(selector: str, count: int, ns: str = TEST_NS, timeout: float = 180) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def check() -> bool:
        nonlocal out
        out = [p for p in get("pods", "-n", ns, "-l", selector)["items"] if ready(p)]
        return len(out) == count

    wait_until(check, timeout, f"{count} ready pod(s) {selector} in {ns}", interval=1.0)
    return out


def agent_status_json() -> list[dict[str, Any]]:
    """`accel status --json` run inside the agent pod: attachments, maps, counters per instance."""
    pod = agent_pod()["metadata"]["name"]
    p = exec_in(pod, "accel", "status", "--json", ns=SYSTEM_NS, container="agent")
    return json.loads(p.stdout)


def agent_counters() -> dict[str, int]:
    inst = [d for d in agent_status_json() if d["instance"] == NODE]
    assert inst, f"the agent has no instance {NODE} pinned"
    return {k: int(v) for k, v in inst[0].get("counters", {}).items()}


def agent_http(path: str) -> Any:
    """The agent's own HTTP endpoint (hostNetwork, port 9464), read from inside its pod."""
    pod = agent_pod()["metadata"]["name"]
    code = ("import json,sys,urllib.request;"
            f"print(urllib.request.urlopen('http://127.0.0.1:9464{path}',timeout=5).read().decode())")
    return json.loads(exec_in(pod, "python3", "-c", code, ns=SYSTEM_NS, container="agent").stdout)


def cgroup2_root() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        if right.split()[0] == "cgroup2" and f[3] == "/":
            return Path(f[4])
    raise AssertionError("no cgroup2 mount on this host")


def root_attachments() -> list[dict[str, Any]]:
    """Programs attached at the host's cgroup v2 root, as bpftool sees them (not as meshaccel says)."""
    p = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup2_root())], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"bpftool cgroup show {cgroup2_root()}: {p.stderr.strip()}")
    return list(json.loads(p.stdout.strip() or "[]"))  # bpftool prints nothing for an empty cgroup


def map_ids() -> set[int]:
    p = subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True, check=True)
    return {m["id"] for m in json.loads(p.stdout)}


def pinned_map_ids(instance: str = NODE) -> set[int]:
    ids = set()
    for pin in (PIN_ROOT / instance).rglob("*"):
        if pin.is_file():
            p = subprocess.run(["bpftool", "-j", "map", "show", "pinned", str(pin)], capture_output=True, text=True)
            try:
                doc = json.loads(p.stdout)
            except ValueError:
                continue
            if isinstance(doc, dict) and "id" in doc:  # program and link pins answer {"error": ...}
                ids.add(doc["id"])
    return ids


def local_endpoint_ips() -> set[str]:
    """Pod addresses in the agent's pinned local_endpoints map, read from the host."""
    from sockops_bpf import loader, maps

    pinned = maps.open_pinned(loader.pin_dir(NODE))
    try:
        return set(pinned.local_endpoints.keys())
    finally:
        pinned.close()


def deployment(name: str, replicas: int, containers: list[dict[str, Any]], labels: dict[str, str] | None = None,
               ns: str = TEST_NS) -> dict[str, Any]:
    labels = labels or {"app": name}
    for c in containers:
        c.setdefault("imagePullPolicy", "Never")  # images are imported, never pulled: nothing leaves
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": containers, "terminationGracePeriodSeconds": 1,
                                       "enableServiceLinks": False}}},
    }


def pod(name: str, containers: list[dict[str, Any]], labels: dict[str, str] | None = None,
        ns: str = TEST_NS) -> dict[str, Any]:
    for c in containers:
        c.setdefault("imagePullPolicy", "Never")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"containers": containers, "terminationGracePeriodSeconds": 1, "restartPolicy": "Never"}}


def service(name: str, selector: dict[str, str], port: int, target: int, ns: str = TEST_NS) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": selector, "ports": [{"name": "p", "port": port, "targetPort": target, "protocol": "TCP"}]}}


def web_server(name: str = "web", replicas: int = 2) -> dict[str, Any]:
    """busybox httpd answering with the pod's name, on 8080."""
    script = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"
    return deployment(name, replicas, [{
        "name": "httpd", "image": APP_IMAGE, "command": ["sh", "-c", script],
        "ports": [{"containerPort": 8080}],
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
    }])


def client_pod(name: str = "client") -> dict[str, Any]:
    return pod(name, [{"name": "sh", "image": APP_IMAGE, "command": ["sleep", "100000"]}])


def cluster_ip(name: str, ns: str = TEST_NS) -> str:
    return str(get("service", "-n", ns, name)["spec"]["clusterIP"])


def http_get(client: str, url: str, timeout: int = 5) -> subprocess.CompletedProcess[str]:
    # busybox's own `timeout`: Debian's busybox wget crashes on its -T option.
    return exec_in(client, "timeout", str(timeout), "wget", "-q", "-O", "-", url, check=False, timeout=timeout + 30)


def tcp_connect(client: str, ip: str, port: int, wait: int = 5) -> subprocess.CompletedProcess[str]:
    """Open a TCP connection from a busybox pod and close it (busybox nc has no -z)."""
    return exec_in(client, "sh", "-c", f"nc -w {wait} {ip} {port} </dev/null", check=False, timeout=wait + 30)


def poll(fn: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    """Call fn until it returns something truthy; that value, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
