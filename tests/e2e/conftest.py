"""End-to-end tests on a real Kubernetes node (`make e2e`): collected only when the node is up.

`make test` stays the fast suite: without MESHACCEL_E2E_KUBECONFIG (exported by scripts/e2e/run.sh
after `node.py up`) nothing in this folder is collected. The files run in name order: install first,
uninstall (and the host leak checks) last.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

if not os.environ.get("MESHACCEL_E2E_KUBECONFIG"):
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config: pytest.Config) -> str:
    if os.environ.get("MESHACCEL_E2E_KUBECONFIG"):
        return f"e2e: node {os.environ.get('MESHACCEL_E2E_NODE')} kubeconfig {os.environ['MESHACCEL_E2E_KUBECONFIG']}"
    return "e2e: tests/e2e not collected (no node up; run `make e2e`)"


@pytest.fixture(scope="session")
def test_namespace() -> Iterator[str]:
    from tests.e2e import cluster

    cluster.kubectl("create", "namespace", cluster.TEST_NS)
    cluster.wait_until(lambda: bool(cluster.kubectl("get", "serviceaccount", "default", "-n", cluster.TEST_NS,
                                                    check=False).returncode == 0),
                       60, "the default service account of the test namespace", interval=0.5)
    yield cluster.TEST_NS
    cluster.kubectl("delete", "namespace", cluster.TEST_NS, "--wait=true", "--timeout=120s", check=False)


@pytest.fixture(scope="session")
def meshaccel(test_namespace: str) -> Iterator[None]:
    """meshaccel installed from deploy/overlays/standalone, CA and agent Ready. If the uninstall test
    did not run (or failed), uninstall here, so the host keeps nothing of it."""
    from tests.e2e import install

    install.install()
    yield
    if install.installed():
        install.uninstall()
