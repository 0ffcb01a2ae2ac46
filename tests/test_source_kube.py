"""The Kubernetes source against an in-process API server speaking the real list/watch protocol,
driven by the real `kubernetes` client: after every disturbance the model equals the server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from accel.agent import Agent, AgentConfig
from accel.kubefake import FakeApiServer
from accel.sources.kube import KubeSource, load_api_client
from accel.state.model import Kind
from accel.state.parse import parse_object
from tests.waiting import wait_until

pytestmark = pytest.mark.unit

NODE = "node-a"


def pod(name: str, ip: str, *, ns: str = "default", node: str = NODE, sa: str = "default") -> dict:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": sa},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def service(name: str, ip: str, ns: str = "default") -> dict:
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def slice_(name: str, svc: str, ips: list[str], ns: str = "default") -> dict:
    return {"kind": "EndpointSlice", "metadata": {"name": name, "namespace": ns,
                                                  "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": NODE} for ip in ips]}


def seed(srv: FakeApiServer) -> None:
    srv.apply({"kind": "Namespace", "metadata": {"name": "default"}})
    srv.apply({"kind": "Namespace", "metadata": {"name": "shop", "annotations": {"meshaccel.io/mtls": "strict"}}})
    for i in range(5):
        srv.apply(pod(f"p{i}", f"10.0.0.{i + 1}", node=NODE if i % 2 == 0 else "node-b"))
    srv.apply(service("web", "10.96.0.10"))
    srv.apply(slice_("web-1", "web", ["10.0.0.1", "10.0.0.3"]))
    srv.apply({"kind": "NetworkPolicy", "metadata": {"name": "deny", "namespace": "shop"},
               "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
    srv.apply({"kind": "AuthorizationPolicy", "metadata": {"name": "allow-web", "namespace": "default"},
               "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/x"]}}],
                                                       "to": [{"operation": {"ports": ["8080"]}}]}]}})
    srv.apply({"kind": "PeerAuthentication", "metadata": {"name": "default", "namespace": "shop"},
               "spec": {"mtls": {"mode": "STRICT"}}})
    srv.apply({"kind": "HTTPRoute", "metadata": {"name": "web", "namespace": "default"},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                                   "backendRefs": [{"name": "web", "port": 80, "weight": 90}],
                                   "timeouts": {"request": "5s"}}]}})


def model_equals_server(agent: Agent, srv: FakeApiServer, kinds: list[Kind] | None = None) -> bool:
    for kind in kinds or list(Kind):
        want = {r.key: r for r in (parse_object(o, kind) for o in srv.objects(str(kind)))}
        if agent.state.records(kind) != want:
            return False
    return agent.reconciler.matches_model()


def expected_local_ips(srv: FakeApiServer) -> set[str]:
    return {o["status"]["podIP"] for o in srv.objects("Pod") if o["spec"]["nodeName"] == NODE}


@pytest.fixture(params=[False, True], ids=["numeric-rv", "out-of-order-rv"])
def srv(request: pytest.FixtureRequest) -> Iterator[FakeApiServer]:
    with FakeApiServer(scramble_rv=request.param) as s:
        seed(s)
        yield s


def start_agent(srv: FakeApiServer, tmp_path: Path) -> tuple[Agent, dict[str, int]]:
    api = load_api_client(str(srv.write_kubeconfig(tmp_path / "kubeconfig")))
    table: dict[str, int] = {}
    source = KubeSource(api, watch_timeout=30, backoff_initial=0.02, backoff_max=0.2, page_size=2)  # paged lists
    agent = Agent(AgentConfig(node=NODE, state_dir=tmp_path), source, table).start()
    assert agent.ready.wait(20), "agent never became ready"
    return agent, table


@pytest.fixture
def agent(srv: FakeApiServer, tmp_path: Path) -> Iterator[tuple[Agent, dict[str, int]]]:
    a, table = start_agent(srv, tmp_path)
    try:
        yield a, table
    finally:
        a.stop()


def test_initial_sync_equals_server(srv: FakeApiServer, agent: tuple[Agent, dict[str, int]]) -> None:
    a, table = agent
    wait_until(lambda: model_equals_server(a, srv), 15, "the model to equal the server")
    assert set(table) == expected_local_ips(srv) == {"10.0.0.1", "10.0.0.3", "10.0.0.5"}
    assert a.state.service_l7("default", "web")  # the HTTPRoute attaches to the Service
    assert srv.count("list Pod") == 1
    assert srv.count("list-page Pod") == 2  # 5 pods in pages of 2


def test_watch_events_and_dropped_streams(srv: FakeApiServer, agent: tuple[Agent, dict[str, int]]) -> None:
    a, table = agent
    assert srv.wait_for_watchers(["Pod", "Service", "EndpointSlice"])
    srv.apply(pod("new", "10.0.1.1"))
    srv.apply(slice_("web-1", "web", ["10.0.0.1", "10.0.1.1"]))
    wait_until(lambda: model_equals_server(a, srv) and "10.0.1.1" in table,
               15, "the new pod in the model and the map")
    for round_ in range(3):
        srv.drop_watches()  # cut mid-event: half a JSON line, no end chunk
        srv.apply(pod(f"during-{round_}", f"10.0.2.{round_ + 1}"))
        if round_ == 0:
            srv.delete("Pod", "default", "p0")
        wait_until(lambda: model_equals_server(a, srv), 15, "the model to equal the server")
    assert "10.0.0.1" not in table and "10.0.2.3" in table
    # Resumed from the last resourceVersion: no relist was needed.
    assert srv.count("list Pod") == 1
    assert srv.count("watch Pod") >= 4


def test_410_gone_relists_and_diffs(srv: FakeApiServer, agent: tuple[Agent, dict[str, int]]) -> None:
    a, _ = agent
    lists_before = sum(srv.count(f"list {k}") for k in Kind)
    srv.force_gone(3)
    srv.drop_watches()
    srv.apply(service("api", "10.96.0.11"))
    wait_until(lambda: sum(srv.count(f"list {k}") for k in Kind) >= lists_before + 3,
               15, "a relist of three kinds")
    wait_until(lambda: model_equals_server(a, srv), 15, "the model to equal the server")


def test_deleted_while_disconnected_replayed_or_relisted(srv: FakeApiServer,
                                                           agent: tuple[Agent, dict[str, int]]) -> None:
    a, table = agent
    for compact in (False, True):
        srv.pause()  # every watch dropped; every request 503 until resume
        srv.delete("Pod", "default", "p2" if not compact else "p4")
        srv.delete("EndpointSlice" if compact else "HTTPRoute", "default", "web-1" if compact else "web")
        srv.apply(pod("p1", "10.0.0.99", node=NODE))  # moved to this node with a new IP
        if compact:
            srv.compact()  # history gone: the client gets 410, relists and must diff out the deletes
        lists_before = srv.count("list Pod")
        srv.resume()
        wait_until(lambda: model_equals_server(a, srv), 15, "the model to equal the server")
        if compact:
            assert srv.count("list Pod") == lists_before + 1
    assert set(table) == expected_local_ips(srv)
    assert "10.0.0.5" not in table and "10.0.0.99" in table
    assert a.metrics.errors.labels("source", "watch_failed")._value.get() > 0


def test_bookmarks_move_the_resume_point(srv: FakeApiServer, agent: tuple[Agent, dict[str, int]]) -> None:
    a, _ = agent
    kinds = [str(k) for k in Kind]
    assert srv.wait_for_watchers(kinds)
    srv.apply({"kind": "Namespace", "metadata": {"name": "later"}})  # only the Namespace watch sees this RV
    srv.bookmark()
    wait_until(lambda: all(a.metrics.source_ops.labels("bookmark", k)._value.get() >= 1 for k in kinds),
               15, "a bookmark on every kind")
    srv.compact()  # anything older than the bookmark is gone now
    srv.drop_watches()
    srv.apply(pod("after", "10.0.3.1"))
    wait_until(lambda: model_equals_server(a, srv), 15, "the model to equal the server")
    # Every kind resumed from its bookmark: none had to relist.
    assert all(srv.count(f"list {k}") == 1 for k in kinds)


def test_crds_absent_still_syncs(tmp_path: Path) -> None:
    with FakeApiServer(crds=False) as s:
        s.apply(pod("solo", "10.1.0.1"))
        a, table = start_agent(s, tmp_path)
        try:
            assert isinstance(a.source, KubeSource)
            assert Kind.AUTHORIZATION_POLICY not in a.source.kinds and Kind.HTTP_ROUTE not in a.source.kinds
            wait_until(lambda: model_equals_server(a, s, [Kind.POD, Kind.SERVICE]),
                       15, "pods and services to equal the server")
            assert table and set(table) == {"10.1.0.1"}
        finally:
            a.stop()


def test_malformed_object_from_api_is_skipped(tmp_path: Path) -> None:
    with FakeApiServer() as s:
        s.apply(pod("good", "10.2.0.1"))
        s.apply(pod("bad", "not-an-ip"))
        a, table = start_agent(s, tmp_path)
        try:
            assert set(table) == {"10.2.0.1"}
            assert a.metrics.bad_input.labels("invalid_object")._value.get() == 1
            s.apply(pod("good2", "10.2.0.2"))
            wait_until(lambda: "10.2.0.2" in table, 15, "the good pod in the map")
            assert a.healthy()
        finally:
            a.stop()


def test_incluster_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kubernetes.config import incluster_config

    (tmp_path / "token").write_text("in-cluster-token")
    (tmp_path / "ca.crt").write_text("not checked until a TLS handshake")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    api = load_api_client(None)
    assert api.configuration.host == "https://10.96.0.1:443"
    assert "in-cluster-token" in str(api.configuration.api_key)


def test_bad_kubeconfig_is_a_user_error(tmp_path: Path) -> None:
    from accel.errors import UserError

    (tmp_path / "kc").write_text("not: [a kubeconfig")
    with pytest.raises(UserError, match="cannot load Kubernetes config"):
        load_api_client(str(tmp_path / "kc"))


def test_garbled_watch_stream_relists(srv: FakeApiServer, agent: tuple[Agent, dict[str, int]]) -> None:
    a, table = agent
    assert srv.wait_for_watchers(["Pod"])
    srv.inject_raw("Pod", b'["not", "an", "event"]\n')
    srv.apply(pod("after-garbage", "10.0.4.1"))
    wait_until(lambda: model_equals_server(a, srv) and "10.0.4.1" in table,
               15, "the pod after the garbage in the model and the map")
    assert a.metrics.errors.labels("source", "watch_garbled")._value.get() >= 1
    assert srv.count("list Pod") == 2 and a.healthy()
