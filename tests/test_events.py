"""Problems as Kubernetes Events, through the real `kubernetes` client against the in-process API server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from accel.events import EventReporter, event_name, event_reason
from accel.kubefake import FakeApiServer
from accel.policy.compiler import PolicyCompiler
from accel.sources.kube import load_api_client
from accel.state.model import Event, EventType, Kind, ObjectKey
from accel.state.parse import parse_object
from accel.state.store import ClusterState
from tests.policy_cluster import netpol, ns, pod
from tests.waiting import eventually

pytestmark = pytest.mark.unit


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    with FakeApiServer() as srv:
        yield srv, srv.write_kubeconfig(tmp_path / "kubeconfig")


def reporter(kubeconfig: Path, **kw: object) -> EventReporter:
    return EventReporter(load_api_client(str(kubeconfig)), host="node-a", **kw).start()  # type: ignore[arg-type]


def test_one_event_per_object_and_reason(api: tuple[FakeApiServer, Path]) -> None:
    srv, kubeconfig = api
    r = reporter(kubeconfig, repeat_seconds=0.0, uid_of=lambda k: "uid-" + k.name)
    np = ObjectKey(Kind.NETWORK_POLICY, "shop", "db")
    try:
        r.report("network_policy_rule_dropped", np, "object=NetworkPolicy/shop/db bad CIDR")
        r.report("network_policy_port_unresolved", np, "object=NetworkPolicy/shop/db port 'web'")
        r.report("mtls_annotation", ObjectKey(Kind.NAMESPACE, "", "shop"), "object=Namespace/shop bad value")
        assert r.wait_idle()
        events = {e["metadata"]["name"]: e for e in srv.event_list()}
        assert len(events) == 3
        e = events[event_name(np, "network_policy_rule_dropped")]
        assert e["metadata"]["namespace"] == "shop" and e["type"] == "Warning"
        assert e["reason"] == "NetworkPolicyRuleDropped" and e["message"] == "object=NetworkPolicy/shop/db bad CIDR"
        assert e["involvedObject"] == {"kind": "NetworkPolicy", "name": "db", "namespace": "shop",
                                       "apiVersion": "networking.k8s.io/v1", "uid": "uid-db"}
        assert e["source"] == {"component": "meshaccel-agent", "host": "node-a"} and e["count"] == 1
        # Cluster-scoped objects get their Events in "default", as Kubernetes does.
        ns_event = events[event_name(ObjectKey(Kind.NAMESPACE, "", "shop"), "mtls_annotation")]
        assert ns_event["metadata"]["namespace"] == "default" and "namespace" not in ns_event["involvedObject"]
        # Heard again: the same Event, patched.
        r.report("network_policy_rule_dropped", np, "object=NetworkPolicy/shop/db still a bad CIDR")
        assert r.wait_idle()
        e = srv.events[("shop", event_name(np, "network_policy_rule_dropped"))]
        assert e["count"] == 2 and e["message"].endswith("still a bad CIDR") and len(srv.events) == 3
        assert srv.count("POST Event") == 3 and srv.count("PATCH Event") == 1
    finally:
        r.stop()


def test_repeats_wait_for_their_interval(api: tuple[FakeApiServer, Path]) -> None:
    srv, kubeconfig = api
    r = reporter(kubeconfig, repeat_seconds=3600.0)
    key = ObjectKey(Kind.POD, "shop", "a")
    try:
        for i in range(5):
            r.report("mtls_annotation", key, f"try {i}")
        assert r.wait_idle()
        assert srv.count("POST Event") == 1 and srv.count("PATCH Event") == 0
        assert srv.event_list()[0]["message"] == "try 0"  # the rest waits for the interval: no API spam
    finally:
        r.stop()


def test_a_restarted_agent_patches_its_earlier_event(api: tuple[FakeApiServer, Path]) -> None:
    srv, kubeconfig = api
    key = ObjectKey(Kind.AUTHORIZATION_POLICY, "shop", "x")
    for message in ("first run", "second run"):
        r = reporter(kubeconfig)
        try:
            r.report("authorization_policy_l7_in_allow", key, message)
            assert r.wait_idle()
        finally:
            r.stop()
    assert len(srv.events) == 1 and srv.event_list()[0]["message"] == "second run"
    assert srv.count("POST Event") == 2 and srv.count("PATCH Event") == 1  # the 409, then a patch


def test_failures_are_counted_and_never_block(api: tuple[FakeApiServer, Path], tmp_path: Path) -> None:
    srv, kubeconfig = api
    srv.fail_events(1)
    r = reporter(kubeconfig, repeat_seconds=0.0, max_queue=2, rate_per_second=1000.0)
    key = ObjectKey(Kind.POD, "shop", "a")
    try:
        r.report("mtls_annotation", key, "one")
        assert r.wait_idle()
        assert r.stats["failed"] == 1 and srv.events == {}
        r.report("mtls_annotation", key, "two")  # the next one goes through
        assert r.wait_idle() and srv.event_list()[0]["message"] == "two"
    finally:
        r.stop()
    # A full queue drops instead of waiting (the agent's apply loop must never block on the API server).
    stopped = EventReporter(load_api_client(str(kubeconfig)), max_queue=2)
    for i in range(5):
        stopped.report("x", key, str(i))
    assert stopped.stats["dropped"] == 3
    # Wrong credentials: counted as failures, nothing raised to the caller.
    bad = tmp_path / "bad-kubeconfig"
    bad.write_text(kubeconfig.read_text().replace("meshaccel-test-token", "wrong"))
    r = reporter(bad)
    try:
        r.report("mtls_annotation", key, "x")
        assert r.wait_idle() and r.stats["failed"] == 1
    finally:
        r.stop()


def test_state_and_policy_problems_become_events_on_their_objects(api: tuple[FakeApiServer, Path]) -> None:
    srv, kubeconfig = api
    state: ClusterState | None = None
    r = reporter(kubeconfig, uid_of=lambda k: getattr(state.get(k), "uid", "") if state else "")
    state = ClusterState(on_object_problem=r.report)
    compiler = PolicyCompiler(on_problem=r.report)
    state.subscribe(compiler.on_change)
    bad_pod = pod("a", "shop", "10.244.0.1")
    bad_pod["metadata"]["annotations"] = {"meshaccel.io/mtls": "sometimes"}
    bad_np = netpol("typo", "shop", {"podSelector": {}, "ingres": []})
    bad_np["metadata"]["uid"] = "np-uid-1"
    try:
        state.apply([Event(EventType.ADDED, parse_object(o)) for o in (ns("shop"), bad_pod, bad_np)], synced=True)
        assert eventually(lambda: len(srv.events) == 2, 10, 0.02)
        by_reason = {e["reason"]: e for e in srv.event_list()}
        assert by_reason[event_reason("mtls_annotation")]["involvedObject"]["name"] == "a"
        np_event = by_reason["NetworkPolicyInvalid"]
        assert np_event["involvedObject"]["uid"] == "np-uid-1" and "unknown field 'ingres'" in np_event["message"]
    finally:
        r.stop()
