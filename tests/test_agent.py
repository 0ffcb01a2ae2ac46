"""The agent end to end without the kernel: manifests -> model -> map, HTTP health/readiness/metrics,
bad input handled without stopping, and the `accel agent` command as a real process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from accel.agent import Agent, AgentConfig
from accel.sources.base import Sink
from accel.sources.manifests import ManifestSource
from tests.waiting import wait_until

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") or line.startswith(f"{name} "):
            series, _, value = line.rpartition(" ")
            got = series[len(name):].strip("{}")
            if ",".join(sorted(got.split(","))) == want or (not want and not got):
                return float(value)
    return float("nan")


GOOD = """apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop, annotations: {meshaccel.io/mtls: "sometimes"}}
spec: {nodeName: n1, serviceAccountName: cart}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: external-db, namespace: shop}
spec: {clusterIP: 10.96.0.9, ports: [{port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: nobody-abc, namespace: shop, labels: {kubernetes.io/service-name: nobody}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.2]}]
"""


def test_agent_follows_manifests_and_survives_bad_input(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "shop.yaml").write_text(GOOD)
    (folder / "notes.yaml").write_text("- this\n- is a list, not Kubernetes YAML\n")
    table: dict[str, int] = {}
    agent = Agent(AgentConfig(node="n1", state_dir=tmp_path, listen=("127.0.0.1", 0)),
                  ManifestSource(folder, poll_interval=0.02), table).start()
    base = f"http://{agent.address}"
    try:
        assert agent.ready.wait(10)
        assert get(base + "/readyz")[0] == 200 and get(base + "/healthz")[0] == 200
        assert set(table) == {"10.0.0.1", "10.0.0.2"}
        _, text = get(base + "/metrics")
        for reason in ("mtls_annotation", "service_without_selector", "endpointslice_unknown_service",
                       "manifest_not_kubernetes"):
            assert metric(text, "meshaccel_bad_input_total", reason=reason) == 1, reason
        assert metric(text, "meshaccel_state_objects", kind="Pod") == 2
        assert metric(text, "meshaccel_map_entries", map="local_endpoints") == 2
        assert metric(text, "meshaccel_source_events_total", kind="Pod", type="ADDED") == 2
        assert metric(text, "meshaccel_ready") == 1
        assert "meshaccel_reconcile_latency_seconds_bucket" in text
        logs = caplog.text
        assert "annotation meshaccel.io/mtls='sometimes' is not strict, permissive or disable" in logs
        assert f"file={folder / 'notes.yaml'} document=0" in logs
        # The fallback for the bad mTLS value is the install default; the pod is still served.
        w = agent.state.workload_by_ip("10.0.0.1")
        assert w is not None and w.mtls.value == "disable"
        # The agent keeps going: a pod added and one deleted reach the map.
        (folder / "more.yaml").write_text(GOOD.split("---")[2].replace("name: db", "name: web")
                                          .replace("10.0.0.2", "10.0.0.3"))
        wait_until(lambda: "10.0.0.3" in table, 15, "the added pod in the map")
        (folder / "more.yaml").unlink()
        wait_until(lambda: "10.0.0.3" not in table, 15, "the deleted pod gone from the map")
        status = json.loads(get(base + "/status")[1])
        assert status["ready"] and status["local_endpoints"] == 2 and status["objects"]["Pod"] == 2
        assert agent.healthy()
    finally:
        agent.stop()


class NeverSyncs:
    """A source whose cluster never finishes listing (an API server that hangs)."""

    name = "never"

    def run(self, sink: Sink, stop: threading.Event) -> None:
        stop.wait()


def test_not_ready_until_synced(tmp_path: Path) -> None:
    agent = Agent(AgentConfig(node="n1", listen=("127.0.0.1", 0)), NeverSyncs(), {}).start()
    try:
        code, body = get(f"http://{agent.address}/readyz")
        assert code == 503 and "initial sync" in body
        assert get(f"http://{agent.address}/healthz")[0] == 200
    finally:
        agent.stop()


def run_accel(*args: str, **kw: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "accel.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def test_accel_agent_command(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "shop.yaml").write_text(GOOD)
    proc = run_accel("agent", "--node", "n1", "--source", f"manifests:{folder}", "--maps", "memory",
                     "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        base = line.strip().rsplit(" ", 1)[1]
        wait_until(lambda: get(base + "/readyz")[0] == 200, 15, "/readyz 200")
        assert json.loads(get(base + "/status")[1])["local_endpoints"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert proc.stderr is not None and "event=agent_stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args,msg", [
    (["--source", "zookeeper"], "--source 'zookeeper' is not 'kube' or 'manifests:DIR'"),
    (["--source", "manifests:/nonexistent/folder"], "is not a folder"),
    (["--source", "manifests:/tmp", "--listen", "localhost"], "is not HOST:PORT"),
])
def test_accel_agent_bad_arguments(args: list[str], msg: str) -> None:
    proc = run_accel("agent", "--node", "n1", "--maps", "memory", *args)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert msg in err and err.count("\n") == 1, err
