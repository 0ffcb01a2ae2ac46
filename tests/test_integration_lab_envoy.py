"""End to end in the lab: the real agent (manifest folder -> model -> xDS + certs) and a real Envoy
in the node's network namespace; HTTP from a pod, by path, to backend pods.

Requests go both to the Envoy listener the agent assigned to the L7 service (on the node address)
and to the service's ClusterIP, whose connections the connect hook sends to that listener.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from accel.errors import UserError
from accel.lab import Lab
from accel.lab_agent import NAMESPACE, LabAgent, agent_dir, stop
from accel.lab_certs import credential
from accel.state.model import MtlsMode
from tests.conftest import require
from tests.mesh_helpers import hbone
from tests.waiting import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.envoy]

SERVER = """
import http.server, sys
name = sys.argv[1].encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", str(len(name))); self.end_headers()
        self.wfile.write(name)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), H).serve_forever()
"""

HTTP_GET = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
except Exception as e:
    print("ERROR", e)
"""

FRONT_VIP = "10.96.0.80"


def service(name: str, backend: str, ip: str | None, vip: str | None = None) -> list[dict[str, Any]]:
    """A Service and, with `ip`, its EndpointSlice (the folder has no endpoints controller)."""
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
           "spec": {"selector": {"app": backend},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    if vip:
        svc["spec"]["clusterIP"] = vip
    if ip is None:
        return [svc]
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": f"{name}-1", "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]}
    return [svc, eps]


def route(a: str, b: str) -> dict[str, Any]:
    def rule(path: str, svc: str) -> dict[str, Any]:
        return {"matches": [{"path": {"type": "PathPrefix", "value": path}}],
                "backendRefs": [{"name": svc, "port": 80}]}
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "front", "namespace": NAMESPACE},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 80}],
                     "rules": [rule("/a", a), rule("/b", b)]}}


def run_in(lab: Lab, pod: str, script: str, *args: str) -> str:
    out = lab.run(pod, [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=30)
    return str(out.stdout).strip()


def test_lab_agent_drives_envoy_routes_and_sds(make_lab: Callable[..., Any], tmp_path: Path) -> None:
    try:
        from accel.envoy import envoy_binary

        envoy_binary()
    except UserError as e:
        require(False, str(e))
    lab: Lab = make_lab(3)
    p2, p3 = lab.pod("pod2"), lab.pod("pod3")
    servers = [lab.popen(p, [sys.executable, "-c", SERVER, p, "8080"]) for p in ("pod2", "pod3")]
    la = LabAgent(lab, envoy=True, certs=True, mtls=MtlsMode.PERMISSIVE)
    try:
        la.up()
        envoy_pid = la.pid("envoy")
        docs = [*service("svc-a", "pod2", p2.ipv4), *service("svc-b", "pod3", p3.ipv4),
                *service("front", "front", None, FRONT_VIP)]
        (la.manifests / "services.yaml").write_text(yaml.safe_dump_all(docs))
        (la.manifests / "route.yaml").write_text(yaml.safe_dump(route("svc-a", "svc-b")))

        wait_until(lambda: f"{NAMESPACE}/front:80" in la.status()["xds"]["listeners"], timeout=30,
                   what="L7 listener in status")
        listener = la.status()["xds"]["listeners"][f"{NAMESPACE}/front:80"]
        assert listener.startswith(lab.node_ipv4 + ":")
        wait_until(lambda: "l7|lab|front|80" in json.dumps(la.config_dump("dynamic_listeners")),
                   timeout=30, what="Envoy has the listener")

        def get(path: str) -> str:
            return run_in(lab, "pod1", HTTP_GET, f"http://{listener}{path}")

        wait_until(lambda: get("/a") == "pod2", timeout=30, what="/a routed to pod2")
        assert get("/b") == "pod3"
        assert get("/a/deeper") == "pod2"

        # Through the ClusterIP: the connect hook sends the L7 service's connections to Envoy's
        # listener (once Envoy has ACKed it), and Envoy routes them by path.
        def via_vip(path: str) -> str:
            return run_in(lab, "pod1", HTTP_GET, f"http://{FRONT_VIP}{path}")

        wait_until(lambda: via_vip("/a") == "pod2", timeout=30, what="/a through the ClusterIP routed to pod2")
        assert via_vip("/b") == "pod3"

        # Change the HTTPRoute file: /a now goes to svc-b.
        (la.manifests / "route.yaml").write_text(yaml.safe_dump(route("svc-b", "svc-b")))
        wait_until(lambda: get("/a") == "pod3", timeout=30, what="/a re-routed to pod3")
        assert get("/b") == "pod3"
        assert via_vip("/a") == "pod3"

        # SDS: pod2 is mTLS-enrolled (namespace annotation); Envoy serves its SVID on pod2's HBONE listener.
        sid = f"spiffe://cluster.local/ns/{NAMESPACE}/sa/pod2"
        wait_until(lambda: la.status()["xds"]["mesh_pods"].get(f"{NAMESPACE}/pod2") == sid, timeout=30,
                   what="pod2's HBONE listener")
        client = credential(tmp_path, "pod1", f"spiffe://cluster.local/ns/{NAMESPACE}/sa/pod1", lab.id)

        def serial_in_status() -> str | None:
            certs = la.status()["certs"]["certificates"]
            return next(c["serial"] for c in certs if c["spiffe_id"] == sid)

        def served_serial() -> str | None:
            return hbone(lab, "pod1", f"{p2.ipv4}:15008", client, "--authority", f"{p2.ipv4}:8080")["serial"]

        first = serial_in_status()
        assert first
        wait_until(lambda: served_serial() == first, timeout=30, what="TLS handshake with pod2's SVID")
        secrets = json.dumps(la.config_dump("dynamic_active_secrets"))
        assert sid in secrets

        # A forced rotation reaches Envoy without a restart.
        assert la.refresh_certs() >= 2
        wait_until(lambda: serial_in_status() not in (None, first), timeout=30, what="new SVID in the agent")
        second = serial_in_status()
        wait_until(lambda: served_serial() == second, timeout=30, what="Envoy serving the rotated SVID")
        assert la.pid("envoy") == envoy_pid and la.envoy_admin("/ready")[0] == 200
        st = la.status()
        assert st["xds"]["nacks_total"] == 0 and st["xds"]["rejected"] == [], st["xds"]
        assert st["certs"]["failing"] == 0

        # `accel status --agent` shows the agent's view in one screen.
        out = subprocess.run([sys.executable, "-m", "accel.cli", "status", "--instance", lab.instance,
                              "--agent", la.url], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert f"agent {la.node}" in out.stdout and "xds" in out.stdout and "certs 3/3" in out.stdout, out.stdout
    finally:
        la.down()
        for s in servers:
            s.kill()
            s.wait()
    assert not agent_dir(lab.id).exists() and stop(lab.id) is False
    assert envoy_pid is not None and not Path(f"/proc/{envoy_pid}").exists()


def test_lab_cli_up_with_agent_and_envoy_then_down_stops_everything(bpf_env: None) -> None:
    try:
        from accel.envoy import envoy_binary

        envoy_binary()
    except UserError as e:
        require(False, str(e))
    import secrets

    from accel.lab import STATE_DIR
    from tests.conftest import leftovers

    lab_id = "it" + secrets.token_hex(2)
    cli = [sys.executable, "-m", "accel.cli", "lab"]
    try:
        up = subprocess.run([*cli, "up", "--id", lab_id, "--pods", "2", "--agent", "--envoy", "--certs"],
                            capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr[-3000:]
        doc = json.loads((agent_dir(lab_id) / "procs.json").read_text())
        pids = [int(p["pid"]) for p in doc["procs"].values()]
        assert len(pids) == 2 and all(Path(f"/proc/{p}").exists() for p in pids)
        assert f"agent for node1 (node lab-{lab_id}): {doc['url']}" in up.stdout
        with urllib.request.urlopen(doc["url"] + "/status", timeout=5) as r:
            st = json.loads(r.read())
        assert st["ready"] and st["objects"]["Pod"] == 2 and st["xds"]["streams"], st
    finally:
        down = subprocess.run([*cli, "down", "--id", lab_id], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr[-3000:]
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert not agent_dir(lab_id).exists() and not (STATE_DIR / f"{lab_id}.json").exists()
    assert leftovers(lab_id) == []
