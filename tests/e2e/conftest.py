"""End-to-end tests on a real Kubernetes node (`make e2e`): collected only then.

`make test` stays the fast suite: without MESHACCEL_E2E=1 (exported by scripts/e2e/run.sh) nothing in
this folder is collected. The files run in name order: the failure drill first (before any node is
up), then the node comes up for the rest (fixture `node`), install, ..., uninstall, and the node goes
down at the end of the session; a packet from the pod range headed off the machine, or anything the
node leaves behind, fails the run there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

if os.environ.get("MESHACCEL_E2E") != "1":
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config: pytest.Config) -> str:
    if os.environ.get("MESHACCEL_E2E") == "1":
        return "e2e: a real single-node Kubernetes (scripts/e2e/node.py), meshaccel from deploy/"
    return "e2e: tests/e2e not collected (run `make e2e`)"


@pytest.fixture(scope="session")
def node() -> Iterator[None]:
    """The e2e node, up for the session; down (and checked clean) after its last test."""
    from tests.e2e import cluster

    up = cluster.node_py("up")
    assert up.returncode == 0, f"the e2e node did not come up:\n{up.stderr[-3000:]}"
    yield
    down = cluster.node_py("down")
    print(down.stderr)
    assert down.returncode == 0, f"the e2e node did not stop cleanly:\n{down.stderr[-3000:]}"
    left = cluster.node_py("leftovers")
    assert left.returncode == 0, f"the e2e node left traces on the host:\n{left.stdout}"


@pytest.fixture(scope="session")
def test_namespace(node: None) -> Iterator[str]:
    from tests.e2e import cluster

    cluster.kubectl("create", "namespace", cluster.TEST_NS)
    cluster.wait_until(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", cluster.TEST_NS,
                                               check=False).returncode == 0,
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
