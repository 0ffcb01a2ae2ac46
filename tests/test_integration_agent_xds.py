"""The agent's xDS server driving a real Envoy on loopback, from a manifest folder.

HTTPRoute files in the folder become Envoy routes (by path, to different backends); a route Envoy
rejects (invalid regex) is a NACK in the agent's /status, its /metrics and `accel status`, while the
previous good config keeps serving; fixing the file clears it. Requests go to the listener the agent
assigned to the service (the ClusterIP redirect is the service LB's connect hook, another issue).
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from accel.envoy import Envoy, EnvoyConfig
from tests.envoy_helpers import backends, free_port
from tests.test_integration_certs import ROOT, start, stop
from tests.waiting import wait_until

pytestmark = [pytest.mark.envoy]
NS = "shop"


def objects(ports: dict[str, int]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in ("front", *ports):
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
                     "spec": {"selector": {"app": name},
                              "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
    for name, port in ports.items():  # the backends all live on 127.0.0.1 and differ by port
        docs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"{name}-1", "namespace": NS,
                                  "labels": {"kubernetes.io/service-name": name}},
                     "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                     "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})
    return docs


def route(matches: list[tuple[str, str, str]]) -> dict[str, Any]:
    """matches: (path type, path, backend service)."""
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "front", "namespace": NS},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 80}],
                     "rules": [{"matches": [{"path": {"type": t, "value": v}}], "backendRefs": [{"name": b, "port": 80}]}
                               for t, v, b in matches]}}


def get(port: int, path: str) -> str:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", path)
        return c.getresponse().read().decode()
    except OSError as e:
        return f"ERROR {e}"


def status(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/status", timeout=5) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_agent_xds_routes_and_reports_nacks(tmp_path: Path, api_type: str) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    with backends(("a", 200), ("b", 200)) as b:
        (folder / "services.yaml").write_text(yaml.safe_dump_all(objects({n: s.port for n, s in b.items()})))
        (folder / "route.yaml").write_text(yaml.safe_dump(route([("PathPrefix", "/a", "a"), ("PathPrefix", "/b", "b")])))
        proc, line = start([sys.executable, "-m", "accel.cli", "agent", "--node", "node-a", "--maps", "memory",
                            "--source", f"manifests:{folder}", "--state-dir", str(tmp_path / "state"),
                            "--listen", "127.0.0.1:0", "--xds-listen", "127.0.0.1:0",
                            "--l7-port-base", str(free_port())], "listening on http://")
        base = line.rsplit(" ", 1)[1]
        m = re.search(r"xds=(\S+)", line)
        assert m, line
        try:
            with Envoy(EnvoyConfig(node_id="node-a", xds_address=m.group(1), api_type=api_type)) as envoy:  # type: ignore[arg-type]
                envoy.wait_live()
                addr = status(base)["xds"]["listeners"][f"{NS}/front:80"]
                port = int(addr.rsplit(":", 1)[1])
                wait_until(lambda: get(port, "/a") == "a", what="/a routed to backend a")
                assert get(port, "/b") == "b"
                assert status(base)["xds"]["nacks_total"] == 0

                # A route Envoy rejects: NACKed, reported, and the previous config keeps serving.
                (folder / "route.yaml").write_text(yaml.safe_dump(route([("RegularExpression", "/a(", "b"),
                                                                         ("PathPrefix", "/b", "a")])))
                wait_until(lambda: status(base)["xds"]["rejected"] != [], what="the NACK in /status")
                st = status(base)["xds"]
                assert st["nacks_total"] >= 1 and st["rejected"][0]["type"] == "rds", st
                assert "missing )" in st["rejected"][0]["error"], st  # what Envoy says about the regex
                assert get(port, "/a") == "a" and get(port, "/b") == "b"
                metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
                assert re.search(r'meshaccel_xds_nacks_total\{type="rds"\} [1-9]', metrics), metrics[-2000:]
                out = subprocess.run([sys.executable, "-m", "accel.cli", "status", "--agent", base], cwd=ROOT,
                                     capture_output=True, text=True, timeout=30)
                assert out.returncode == 0 and "REJECTED by node-a rds" in out.stdout, out.stdout + out.stderr

                # Fixing the file clears the rejection and the new routes serve.
                (folder / "route.yaml").write_text(yaml.safe_dump(route([("PathPrefix", "/a", "b"),
                                                                         ("PathPrefix", "/b", "a")])))
                wait_until(lambda: get(port, "/a") == "b", what="the fixed route")
                assert get(port, "/b") == "a"
                wait_until(lambda: status(base)["xds"]["rejected"] == [], what="the rejection cleared")
                assert envoy.running()
        finally:
            assert stop(proc) == 0


def test_status_without_an_agent_says_so_in_one_line() -> None:
    port = free_port()  # nothing listens there
    out = subprocess.run([sys.executable, "-m", "accel.cli", "status", "--agent", f"http://127.0.0.1:{port}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stderr.count("Traceback") == 0
    lines = [ln for ln in out.stdout.splitlines() if "agent" in ln]
    assert lines == [f"no agent answers at http://127.0.0.1:{port} ([Errno 111] Connection refused); "
                     "start one with `accel agent` or pass --agent URL"], out.stdout
