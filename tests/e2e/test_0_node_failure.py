"""Bad input: a component of the node that fails to start stops the whole node, the message names the
component and its log, and nothing is left on the host. Runs before the session's node is up."""

from __future__ import annotations

import pytest

from tests.e2e import cluster


@pytest.mark.parametrize("component", ["kube-controller-manager", "kubelet"])
def test_a_component_that_fails_to_start_stops_the_node_cleanly(component: str) -> None:
    p = cluster.node_py("up", env={"MESHACCEL_E2E_BREAK": component})
    assert p.returncode == 1, p.stderr[-2000:]
    failed = [ln for ln in p.stderr.splitlines() if "FAILED" in ln]
    assert failed, p.stderr[-2000:]
    assert component in failed[0] and f"/var/log/meshaccel-e2e/{component}.log" in failed[0], failed[0]
    assert "stopping what was started" in p.stderr
    left = cluster.node_py("leftovers")
    assert left.returncode == 0, f"a failed start left traces:\n{left.stdout}"
