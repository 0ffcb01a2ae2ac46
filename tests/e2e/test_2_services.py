"""ClusterIP services on a node with no kube-proxy: meshaccel's socket LB serves every ClusterIP, from
EndpointSlices the real controller writes."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e import cluster
from tests.e2e.cluster import TEST_NS, kubectl

pytestmark = pytest.mark.usefixtures("meshaccel")


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    cluster.apply(cluster.web_server("web", 2), cluster.service("web", {"app": "web"}, 80, 8080),
                  cluster.client_pod("client"))
    cluster.wait_pods_ready("app=web", 2)
    cluster.kubectl("wait", "-n", TEST_NS, "--for=condition=Ready", "pod/client", "--timeout=120s", timeout=150)
    yield cluster.cluster_ip("web")
    kubectl("delete", "-n", TEST_NS, "deployment/web", "service/web", "pod/client", "--wait=false")


def test_no_kube_proxy_on_the_node() -> None:
    procs = subprocess.run(["pgrep", "-x", "kube-proxy"], capture_output=True, text=True)
    assert procs.returncode == 1, f"a kube-proxy runs: {procs.stdout}"
    for tool in ("iptables", "ip6tables"):
        nat = subprocess.run([tool, "-t", "nat", "-S"], capture_output=True, text=True).stdout
        assert "KUBE-SERVICES" not in nat and "KUBE-SVC-" not in nat, f"{tool} has kube-proxy chains:\n{nat}"
    assert cluster.get("daemonsets", "-n", "kube-system")["items"] == []


def test_endpointslices_come_from_the_real_controller(web: str) -> None:
    pods = {p["status"]["podIP"] for p in cluster.get("pods", "-n", TEST_NS, "-l", "app=web")["items"]}
    slices = cluster.get("endpointslices", "-n", TEST_NS, "-l", "kubernetes.io/service-name=web")["items"]
    assert slices and all(s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
                          == "endpointslice-controller.k8s.io" for s in slices), slices
    addrs = {a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"]}
    assert addrs == pods


def test_http_through_the_cluster_ip_reaches_both_backends(web: str) -> None:
    names = {p["metadata"]["name"] for p in cluster.get("pods", "-n", TEST_NS, "-l", "app=web")["items"]}
    seen = set()
    for _ in range(40):
        r = cluster.http_get("client", f"http://{web}/")
        assert r.returncode == 0, f"GET http://{web}/ failed: {r.stderr}"
        seen.add(r.stdout.strip())
        if seen == names:
            break
    assert seen == names, f"answers came from {seen}, the backends are {names}"


def test_the_kubernetes_service_is_served_too(web: str) -> None:
    """The API server's own ClusterIP (10.96.0.1:443) leads to its real address, through the agent."""
    vip = cluster.cluster_ip("kubernetes", ns="default")
    r = cluster.tcp_connect("client", vip, 443)
    assert r.returncode == 0, f"connect to {vip}:443 from a pod failed: {r.stderr}"


def test_scale_to_zero_is_refused_at_once_and_back_is_served(web: str) -> None:
    kubectl("scale", "-n", TEST_NS, "deployment/web", "--replicas=0")
    cluster.poll(lambda: not any(s.get("endpoints") for s in cluster.get(
        "endpointslices", "-n", TEST_NS, "-l", "kubernetes.io/service-name=web")["items"]), 120,
        "the EndpointSlices of web to empty")

    def refused() -> str | None:
        r = cluster.tcp_connect("client", web, 80)
        return r.stderr if "refused" in r.stderr.lower() else None

    # "Connection refused" at once, not a timeout: the LB refuses a service with no backend itself.
    cluster.poll(refused, 30, f"connect to {web}:80 to be refused")
    kubectl("scale", "-n", TEST_NS, "deployment/web", "--replicas=2")
    cluster.wait_pods_ready("app=web", 2)
    r = cluster.poll(lambda: (lambda x: x if x.returncode == 0 else None)(cluster.http_get("client", f"http://{web}/")),
                     60, f"http://{web}/ to be served again")
    assert r.stdout.strip().startswith("web-")


def test_an_excluded_pod_keeps_the_service_address(web: str) -> None:
    """meshaccel.io/exclude: the agent finds the pod's network namespace through the kubelet's pod
    cgroup (hostPID) and leaves its connects alone; with no kube-proxy the VIP then leads nowhere."""
    ns = "e2e-excluded"
    kubectl("create", "namespace", ns)
    kubectl("label", "namespace", ns, "meshaccel.io/exclude=true")
    try:
        cluster.apply(cluster.client_pod("excluded") | {"metadata": {"name": "excluded", "namespace": ns}})
        kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/excluded", "--timeout=120s", timeout=150)
        before = cluster.agent_counters()["lb_skipped"]

        def skipped() -> str | None:
            r = cluster.exec_in("excluded", "sh", "-c", f"nc -w 3 {web} 80 </dev/null", ns=ns, check=False)
            return r.stderr if r.returncode != 0 and cluster.agent_counters()["lb_skipped"] > before else None

        err = cluster.poll(skipped, 60, "the excluded pod's connect to keep the VIP")
        assert "no route to host" in err.lower(), err  # the unreachable service route: nothing leaves
        assert cluster.http_get("client", f"http://{web}/").returncode == 0  # others are still served
    finally:
        kubectl("delete", "namespace", ns, "--wait=false")
