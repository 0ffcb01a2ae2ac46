"""Install and uninstall meshaccel exactly as the README tells an operator to."""

from __future__ import annotations

from tests.e2e import cluster
from tests.e2e.cluster import NODE_IP, SYSTEM_NS, kubectl

OVERLAY = str(cluster.REPO / "deploy" / "overlays" / "standalone")
CLEANUP = str(cluster.REPO / "deploy" / "cleanup")


def install() -> None:
    # No kube-proxy: the agent and the CA reach the API server by its real address (README, operator
    # section). The namespace comes first so the ConfigMap can be there before the pods start.
    kubectl("create", "namespace", SYSTEM_NS)
    kubectl("create", "configmap", "meshaccel-kube-apiserver", "-n", SYSTEM_NS,
            f"--from-literal=KUBERNETES_SERVICE_HOST={NODE_IP}",
            f"--from-literal=KUBERNETES_SERVICE_PORT={cluster.API_PORT}")
    kubectl("apply", "-k", OVERLAY)
    kubectl("rollout", "status", "-n", SYSTEM_NS, "deployment/meshaccel-ca", "--timeout=300s", timeout=330)
    kubectl("rollout", "status", "-n", SYSTEM_NS, "daemonset/meshaccel-agent", "--timeout=300s", timeout=330)


def installed() -> bool:
    return kubectl("get", "namespace", SYSTEM_NS, check=False).returncode == 0


def uninstall() -> None:
    """The README's uninstall: delete the install, then run the cleanup DaemonSet on every node."""
    kubectl("delete", "-k", OVERLAY, "--wait=true", "--timeout=180s", check=False, timeout=240)
    kubectl("delete", "namespace", SYSTEM_NS, "--wait=true", "--timeout=120s", "--ignore-not-found", timeout=180)
    kubectl("apply", "-k", CLEANUP)
    kubectl("rollout", "status", "-n", "meshaccel-cleanup", "daemonset/meshaccel-cleanup", "--timeout=300s",
            timeout=330)
    kubectl("delete", "-k", CLEANUP, "--wait=true", "--timeout=120s", timeout=180)
