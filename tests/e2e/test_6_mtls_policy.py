"""The mTLS annotation and NetworkPolicy on real pods of the real node: the node Envoy's listeners come up
inside annotated pods' namespaces (capture_ready is announced only after Envoy ACKed them), their SVIDs
come from the CA, same-node traffic keeps the kernel path; a NetworkPolicy refuses a connect() at once,
`accel policy check` names it, and deleting it allows again. (One node: the tunnel between nodes is
tests/test_mtls.py's, on the two-node lab.)"""

from __future__ import annotations

import json

import pytest

from tests.e2e import cluster
from tests.e2e.cluster import SYSTEM_NS, TEST_NS, kubectl

pytestmark = pytest.mark.usefixtures("meshaccel")


def test_mtls_annotation_enrolls_real_pods() -> None:
    kubectl("annotate", "namespace", TEST_NS, "meshaccel.io/mtls=strict", "--overwrite")
    try:
        cluster.apply(cluster.web_server("mtls-web", 1), cluster.service("mtls-web", {"app": "mtls-web"}, 80, 8080),
                      cluster.client_pod("mtls-client"))
        web = cluster.wait_pods_ready("app=mtls-web", 1)[0]
        kubectl("wait", "-n", TEST_NS, "--for=condition=Ready", "pod/mtls-client", "--timeout=120s", timeout=150)
        wanted = {f"{TEST_NS}/{web['metadata']['name']}", f"{TEST_NS}/mtls-client"}
        cluster.poll(lambda: wanted <= set(cluster.agent_http("/status").get("capture_ready") or []), 120,
                     "the node Envoy's listeners inside both annotated pods (capture_ready)")
        certs = cluster.agent_http("/status")["certs"]
        ids = {c["spiffe_id"] for c in certs["certificates"] if c["serial"]}
        assert f"spiffe://cluster.local/ns/{TEST_NS}/sa/default" in ids, certs
        # Same node: still the kernel fast path, and the app sees nothing different.
        r = cluster.http_get("mtls-client", f"http://{cluster.cluster_ip('mtls-web')}/")
        assert r.returncode == 0 and r.stdout.strip() == web["metadata"]["name"], r.stderr
    finally:
        kubectl("annotate", "namespace", TEST_NS, "meshaccel.io/mtls-", check=False)
        kubectl("delete", "-n", TEST_NS, "deployment/mtls-web", "service/mtls-web", "pod/mtls-client",
                "--wait=false", "--ignore-not-found")


def test_network_policy_denies_at_connect_on_real_pods() -> None:
    cluster.apply(cluster.web_server("np-web", 1), cluster.client_pod("np-client"))
    try:
        web = cluster.wait_pods_ready("app=np-web", 1)[0]
        kubectl("wait", "-n", TEST_NS, "--for=condition=Ready", "pod/np-client", "--timeout=120s", timeout=150)
        url = f"http://{web['status']['podIP']}:8080/"
        assert cluster.http_get("np-client", url).returncode == 0
        cluster.apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "metadata": {"name": "np-deny", "namespace": TEST_NS},
                       "spec": {"podSelector": {"matchLabels": {"app": "np-web"}}, "policyTypes": ["Ingress"]}})

        def refused() -> str | None:
            r = cluster.tcp_connect("np-client", web["status"]["podIP"], 8080)
            return r.stderr if r.returncode != 0 and "timed out" not in r.stderr.lower() else None

        cluster.poll(refused, 30, "the denied connect to fail at once")
        agent = cluster.agent_pod()["metadata"]["name"]
        check = cluster.exec_in(agent, "accel", "policy", "check", f"{TEST_NS}/np-client",
                                f"{TEST_NS}/{web['metadata']['name']}", "8080", "--json", ns=SYSTEM_NS,
                                container="agent", check=False)
        assert check.returncode == 1, check.stderr  # exit 1: DENY
        verdict = json.loads(check.stdout)
        assert verdict["verdict"] == "DENY" and "np-deny" in json.dumps(verdict), verdict
        kubectl("delete", "-n", TEST_NS, "networkpolicy/np-deny")
        cluster.poll(lambda: cluster.http_get("np-client", url).returncode == 0, 30, "the connect to be allowed again")
    finally:
        kubectl("delete", "-n", TEST_NS, "deployment/np-web", "pod/np-client", "networkpolicy/np-deny",
                "--wait=false", "--ignore-not-found")
