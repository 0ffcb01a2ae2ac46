"""The agent pod is deleted while traffic flows: the DaemonSet brings a new one; no connection breaks
(the kernel keeps splicing and load-balancing with what is pinned); a Service added while no agent
ran works once the new agent is Ready."""

from __future__ import annotations

import pytest

from tests.e2e import cluster, traffic
from tests.e2e.cluster import SYSTEM_NS, TEST_NS, kubectl

pytestmark = pytest.mark.usefixtures("meshaccel")


def test_agent_restart_breaks_nothing_and_catches_up() -> None:
    conns = 3
    cluster.apply(cluster.web_server("web1", 1), cluster.service("web1", {"app": "web1"}, 80, 8080))
    cluster.wait_pods_ready("app=web1", 1)
    vip1 = cluster.cluster_ip("web1")
    # New connections through a ClusterIP every 0.3 s, from before the restart until after it.
    loop = (f"ok=0; bad=0; for i in $(seq 1 150); do if timeout 3 wget -q -O /dev/null http://{vip1}/; "
            "then ok=$((ok+1)); else bad=$((bad+1)); fi; sleep 0.3; done; echo ok=$ok bad=$bad")
    cluster.apply(cluster.pod("vip-loop", [{"name": "sh", "image": cluster.APP_IMAGE, "command": ["sh", "-c", loop]}]))
    # Long-lived spliced streams: ~40 s each.
    ip = traffic.start_server("restart-server", 9001, conns, pause=0.2)
    traffic.start_client("restart-client", ip, 9001, conns, msgs=200, pause=0.2)
    try:
        old = cluster.agent_pod()
        kubectl("delete", "pod", "-n", SYSTEM_NS, old["metadata"]["name"], "--wait=false")
        # While no agent is ready: a new Service and its backend appear.
        cluster.apply(cluster.web_server("web2", 1), cluster.service("web2", {"app": "web2"}, 80, 8080))

        def new_agent_ready() -> bool:
            pods = cluster.get("pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/name=meshaccel-agent")["items"]
            return any(p["metadata"]["uid"] != old["metadata"]["uid"] and cluster.ready(p) for p in pods)

        cluster.poll(new_agent_ready, 300, "the DaemonSet's new agent pod to be Ready")
        cluster.wait_pods_ready("app=web2", 1)
        cluster.apply(cluster.client_pod("restart-probe"))
        kubectl("wait", "-n", TEST_NS, "--for=condition=Ready", "pod/restart-probe", "--timeout=120s", timeout=150)
        vip2 = cluster.cluster_ip("web2")
        r = cluster.poll(lambda: (lambda x: x if x.returncode == 0 else None)(
            cluster.http_get("restart-probe", f"http://{vip2}/")), 60, f"the new Service web2 ({vip2}) to answer")
        assert r.stdout.strip().startswith("web2-")
        traffic.assert_bit_exact(traffic.finished("restart-client"), traffic.finished("restart-server"), conns)
        loop_out = cluster.poll(lambda: (lambda p: kubectl("logs", "-n", TEST_NS, "vip-loop").stdout
                                         if p in ("Succeeded", "Failed") else None)(
            cluster.get("pod", "-n", TEST_NS, "vip-loop")["status"].get("phase")), 120, "the ClusterIP loop to end")
        assert "bad=0" in loop_out and "ok=150" in loop_out, f"connections through {vip1} failed: {loop_out}"
    finally:
        traffic.delete("restart-client", "restart-server", "vip-loop", "restart-probe")
        kubectl("delete", "-n", TEST_NS, "deployment/web1", "deployment/web2", "service/web1", "service/web2",
                "--wait=false", "--ignore-not-found")
