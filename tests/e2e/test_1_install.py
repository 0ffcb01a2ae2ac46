"""`kubectl apply -k deploy/overlays/standalone` on a real node: the CA and the agent become Ready and the
programs sit at the host's real cgroup v2 root."""

from __future__ import annotations

import pytest

from tests.e2e import cluster
from tests.e2e.cluster import NODE, SYSTEM_NS

pytestmark = pytest.mark.usefixtures("meshaccel")


def test_ca_and_agent_are_ready() -> None:
    ca = cluster.get("deployment", "-n", SYSTEM_NS, "meshaccel-ca")
    assert ca["status"].get("availableReplicas") == 1, ca["status"]
    ds = cluster.get("daemonset", "-n", SYSTEM_NS, "meshaccel-agent")["status"]
    assert ds["desiredNumberScheduled"] == 1 and ds["numberReady"] == 1, ds
    agent = cluster.agent_pod()
    assert agent["spec"]["nodeName"] == NODE
    assert all(c["ready"] for c in agent["status"]["containerStatuses"]), agent["status"]["containerStatuses"]
    # The CA published its root for the agents, and the agent got going with the kube source.
    root = cluster.get("configmap", "-n", SYSTEM_NS, "meshaccel-ca-root")["data"]["root-cert.pem"]
    assert "BEGIN CERTIFICATE" in root
    status = cluster.agent_http("/status")
    assert status["ready"] and status["source"] == "kube" and status["node"] == NODE, status
    # The CA follows only what its RBAC lets it read: no 403 from the API server in its log.
    ca_log = cluster.kubectl("logs", "-n", SYSTEM_NS, "deployment/meshaccel-ca", "-c", "ca").stdout
    assert "forbidden" not in ca_log.lower(), ca_log[-2000:]


def test_accel_status_in_the_agent_pod_shows_programs_at_the_real_cgroup_root() -> None:
    root = cluster.cgroup2_root()  # discovered on the host: /sys/fs/cgroup/unified here (hybrid)
    docs = [d for d in cluster.agent_status_json() if d["instance"] == NODE]
    assert docs, "accel status in the agent pod lists no instance named after the node"
    attached = {(a["program"], a["hook"]): a.get("cgroup") for a in docs[0]["attachments"]}
    cgroup_hooks = {k: v for k, v in attached.items() if v}
    assert any(h == "cgroup_sock_ops" for _, h in cgroup_hooks), attached
    assert set(cgroup_hooks.values()) == {str(root)}, f"attached at {set(cgroup_hooks.values())}, not at {root}"
    # The human-readable form says the same.
    pod = cluster.agent_pod()["metadata"]["name"]
    text = cluster.exec_in(pod, "accel", "status", ns=SYSTEM_NS, container="agent").stdout
    assert f"instance {NODE}" in text and str(root) in text, text
    # And the kernel agrees, seen from the host with bpftool rather than through meshaccel (program
    # names are cut to 15 characters there).
    at_root = {p["name"] for p in cluster.root_attachments()}
    assert {name[:15] for name, _ in cgroup_hooks} <= at_root, at_root
