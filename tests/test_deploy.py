"""The manifests in deploy/ build with kustomize, validate against the Kubernetes schemas, call only
`accel` flags that exist, and give Envoy a bootstrap the real Envoy accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from accel.cli import build_parser
from accel.envoy import envoy_binary
from tests.conftest import require

pytestmark = pytest.mark.unit

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
OVERLAYS = ["standalone", "with-istio"]
CLEANUP = "../cleanup"  # relative to deploy/overlays
K8S_VERSION = "1.33.0"


def build(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    require(kubectl is not None, "kubectl is needed to build the kustomize overlays")
    assert kubectl is not None
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                         text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("overlay", [*OVERLAYS, CLEANUP])
def test_overlay_validates_against_kubernetes_schemas(overlay: str) -> None:
    objs = build(overlay)
    kinds = {o["kind"] for o in objs}
    want = {"DaemonSet"} if overlay == CLEANUP else {"DaemonSet", "Deployment", "ClusterRole", "ServiceAccount",
                                                     "ConfigMap", "Service"}
    assert want <= kinds
    for o in objs:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def _accel_invocations(objs: list[dict[str, Any]]) -> list[list[str]]:
    calls = []
    for o in objs:
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            if c.get("image", "").startswith("meshaccel") and not c.get("command"):
                calls.append([re.sub(r"\$\((\w+)\)", "node-a", a) for a in c.get("args", [])])
    return calls


@pytest.mark.parametrize("overlay", [*OVERLAYS, CLEANUP])
def test_every_accel_invocation_parses(overlay: str) -> None:
    calls = _accel_invocations(build(overlay))
    assert {c[0] for c in calls} >= ({"uninstall"} if overlay == CLEANUP else {"agent", "ca"})
    parser = build_parser()
    for argv in calls:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{overlay}: `accel {' '.join(argv)}` does not parse")


def test_istio_overlay_plugs_istio_cacerts() -> None:
    ca = next(o for o in build("with-istio") if o["kind"] == "Deployment")
    args = ca["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--secret=istio-system/cacerts" in args
    assert ca["spec"]["template"]["spec"]["initContainers"] == []  # never create a root over Istio's


@pytest.mark.envoy
def test_envoy_bootstrap_is_accepted_by_envoy(tmp_path: Path) -> None:
    """The real Envoy validates the bootstrap, started with the DaemonSet's own command line."""
    objs = build("standalone")
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and "bootstrap.yaml" in o.get("data", {}))
    boot = tmp_path / "bootstrap.yaml"
    boot.write_text(cm["data"]["bootstrap.yaml"])
    ds = next(o for o in objs if o["kind"] == "DaemonSet")
    envoy = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "envoy")
    args = [a.replace("$(NODE_NAME)", "node-a").replace("/etc/meshaccel/envoy/bootstrap.yaml", str(boot))
            for a in envoy["args"]]
    p = subprocess.run([envoy_binary(), "--mode", "validate", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
