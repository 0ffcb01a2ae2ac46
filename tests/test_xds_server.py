"""The ADS server and the snapshot cache against in-process gRPC clients on 127.0.0.1."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshxds import resources as R
from meshxds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot, SnapshotCache
from meshxds.server import XdsServer
from tests.waiting import wait_until

pytestmark = [pytest.mark.unit]


def snap(version: str, clusters: dict[str, int], route_to: str = "") -> Snapshot:
    """clusters: name -> backend port; one listener + route pointing at `route_to`."""
    target = route_to or sorted(clusters)[0]
    return Snapshot.build(
        version,
        clusters=[R.eds_cluster(c) for c in clusters],
        endpoints=[R.load_assignment(c, [R.Backend("127.0.0.1", p)]) for c, p in clusters.items()],
        listeners=[R.http_listener("l", "127.0.0.1", 10000, "r")],
        routes=[R.route_config("r", [R.route_components_pb2.Route(match=R.route_match(),
                                                                  route=R.route_action([(target, 1)]))])],
    )


class Client:
    """A scripted ADS client: `send` requests, `recv` responses."""

    def __init__(self, channel: grpc.Channel, delta: bool = False) -> None:
        self.requests: queue.Queue[Any] = queue.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        method = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self.responses = method(self._iter(), timeout=30)

    def _iter(self) -> Iterator[Any]:
        while (r := self.requests.get()) is not None:
            yield r

    def send(self, req: Any) -> None:
        self.requests.put(req)

    def recv(self) -> Any:
        return next(self.responses)

    def close(self) -> None:
        self.requests.put(None)
        self.responses.cancel()


@pytest.fixture
def env() -> Iterator[tuple[XdsServer, SnapshotCache, grpc.Channel]]:
    cache = SnapshotCache()
    server = XdsServer(cache)
    server.start()
    channel = grpc.insecure_channel(server.address)
    try:
        yield server, cache, channel
    finally:
        channel.close()
        server.stop()


def sotw(node: str, type_url: str, names: list[str] | None = None, resp: Any = None, error: str = "") -> Any:
    r = discovery_pb2.DiscoveryRequest(node={"id": node}, type_url=type_url, resource_names=names or [])
    if resp is not None:
        r.version_info, r.response_nonce = resp.version_info, resp.nonce
    if error:
        r.error_detail.message = error
    return r


def subscribe_all(c: Client, node: str) -> dict[str, Any]:
    """Subscribe like Envoy: CDS, EDS for what it gets, LDS, RDS; ACK everything; returns the last of each."""
    got: dict[str, Any] = {}
    c.send(sotw(node, CLUSTER))
    c.send(sotw(node, LISTENER))
    pending = 2
    while pending:
        r = c.recv()
        got[r.type_url] = r
        pending -= 1
        if r.type_url == CLUSTER:
            c.send(sotw(node, ENDPOINT, [R.cluster_pb2.Cluster.FromString(a.value).name for a in r.resources]))
            pending += 1
        if r.type_url == LISTENER:
            c.send(sotw(node, ROUTE, ["r"]))
            pending += 1
        c.send(sotw(node, r.type_url, _names(c, r), r))
    return got


def _names(c: Client, r: Any) -> list[str]:
    if r.type_url == ENDPOINT:
        return [R.endpoint_pb2.ClusterLoadAssignment.FromString(a.value).cluster_name for a in r.resources]
    if r.type_url == ROUTE:
        return ["r"]
    return []


def test_snapshot_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Snapshot.build("1", clusters=[R.eds_cluster("a"), R.eds_cluster("a")])
    with pytest.raises(TypeError, match="expected envoy.config.cluster.v3.Cluster"):
        Snapshot.build("1", clusters=[R.load_assignment("a", [])])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="version"):
        Snapshot.build("")
    s1, s2 = snap("1", {"a": 1}), snap("2", {"a": 1})
    assert s1.entries(CLUSTER)["a"].version == s2.entries(CLUSTER)["a"].version  # content versions
    assert s1.eds_of_cluster == {"a": "a"} and s1.rds_of_listener == {"l": frozenset({"r"})}


def test_push_order_and_removals_after(env) -> None:  # type: ignore[no-untyped-def]
    server, cache, channel = env
    cache.set_snapshot("n", snap("1", {"old": 1}))
    c = Client(channel)
    try:
        subscribe_all(c, "n")
        wait_until(lambda: server.settled("n", "1"))
        # v2 adds "new", points the route at it and drops "old".
        cache.set_snapshot("n", snap("2", {"new": 2}, route_to="new"))
        seq = []
        while True:
            r = c.recv()
            names = sorted(_any_name(a) for a in r.resources)
            seq.append((r.type_url, names))
            if r.type_url == CLUSTER and names == ["new", "old"]:
                c.send(sotw("n", ENDPOINT, ["new", "old"]))  # Envoy asks for the new cluster's endpoints
            c.send(sotw("n", r.type_url, _names(c, r) if r.type_url != ENDPOINT else ["new", "old"], r))
            if r.type_url == CLUSTER and names == ["new"]:
                break
        assert seq[0] == (CLUSTER, ["new", "old"])  # make before break: old kept at first
        kinds = [t for t, _ in seq]
        assert kinds.index(ENDPOINT) < kinds.index(ROUTE)
        assert seq[-1] == (CLUSTER, ["new"])  # the removal comes last
        wait_until(lambda: server.settled("n", "2"))
    finally:
        c.close()


def _any_name(a: Any) -> str:
    if a.type_url == ENDPOINT:
        return str(R.endpoint_pb2.ClusterLoadAssignment.FromString(a.value).cluster_name)
    return str(R.cluster_pb2.Cluster.FromString(a.value).name) if a.type_url == CLUSTER else "?"


def test_nack_is_recorded_and_not_resent(env) -> None:  # type: ignore[no-untyped-def]
    server, cache, channel = env
    cache.set_snapshot("n", snap("1", {"a": 1}))
    c = Client(channel)
    try:
        c.send(sotw("n", CLUSTER))
        r = c.recv()
        c.send(sotw("n", CLUSTER, [], r, error="cluster a: bad thing"))
        wait_until(lambda: server.status().nacks_total == 1)
        cache.set_snapshot("n", snap("1", {"a": 1}))  # same content again: nothing to send
        cache.set_snapshot("n", snap("2", {"a": 1, "b": 2}))  # new content: one new response
        r2 = c.recv()
        assert r2.version_info == "2" and len(r2.resources) == 2 and r2.nonce != r.nonce
        st = server.status()
        assert st.responses_total == 2
        assert st.recent_nacks[-1].error == "cluster a: bad thing" and st.recent_nacks[-1].version == "1"
        cds = [t for t in st.streams[0].types if t.type_url == CLUSTER][0]
        assert cds.nacks == 1 and cds.last_error == "cluster a: bad thing"
    finally:
        c.close()


def test_unknown_resources_wait_and_a_silent_client_does_not_block_others(env) -> None:  # type: ignore[no-untyped-def]
    server, cache, channel = env
    cache.set_snapshot("n", snap("1", {"a": 1}))
    waiting, silent, normal = Client(channel), Client(channel), Client(channel)
    try:
        waiting.send(sotw("n", ENDPOINT, ["not-yet"]))  # asks for something nobody has
        silent.send(sotw("n", CLUSTER))
        assert len(silent.recv().resources) == 1  # and never ACKs
        normal.send(sotw("n", CLUSTER))
        r = normal.recv()
        normal.send(sotw("n", CLUSTER, [], r))
        cache.set_snapshot("n", snap("2", {"a": 1, "b": 2}))
        r2 = normal.recv()
        assert r2.version_info == "2" and len(r2.resources) == 2
        st = {s.stream_id: s for s in server.status().streams}
        assert len(st) == 3
        awaiting = [s for s in st.values() if any(t.awaiting_ack and t.version_sent == "1" for t in s.types)]
        assert len(awaiting) == 1  # the silent one: still at v1, nothing more queued for it
        # The waiting client gets its resource as soon as it exists.
        cache.set_snapshot("n", Snapshot.build("3", endpoints=[R.load_assignment("not-yet", [])]))
        r3 = waiting.recv()
        assert r3.type_url == ENDPOINT and r3.version_info == "3"
    finally:
        for c in (waiting, silent, normal):
            c.close()


def test_bad_streams_get_clear_errors(env) -> None:  # type: ignore[no-untyped-def]
    server, cache, channel = env
    cache.set_snapshot("n", snap("1", {"a": 1}))
    raw = channel.stream_stream(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
        request_serializer=lambda b: b, response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(raw(iter([b"\x0a\xff\xff\xff\xff"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "could not decode DeltaDiscoveryRequest" in (err.value.details() or "")  # type: ignore[attr-defined]
    no_id = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER).SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        list(raw(iter([no_id]), timeout=10))
    assert "node.id" in (err.value.details() or "")  # type: ignore[attr-defined]
    # Unknown type URL: ignored, and the same stream goes on to work.
    c = Client(channel, delta=True)
    try:
        c.send(discovery_pb2.DeltaDiscoveryRequest(node={"id": "n"}, type_url="type.googleapis.com/x.Y"))
        c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER))
        r = c.recv()
        assert r.type_url == CLUSTER and [x.name for x in r.resources] == ["a"]
        assert server.status().bad_requests_total == 3
    finally:
        c.close()


def test_delta_sends_only_changes_and_removals(env) -> None:  # type: ignore[no-untyped-def]
    _server, cache, channel = env
    cache.set_snapshot("n", snap("1", {"a": 1, "b": 2}))
    c = Client(channel, delta=True)
    try:
        c.send(discovery_pb2.DeltaDiscoveryRequest(node={"id": "n"}, type_url=ENDPOINT,
                                                   resource_names_subscribe=["a", "b"]))
        r = c.recv()
        assert sorted(x.name for x in r.resources) == ["a", "b"]
        c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, response_nonce=r.nonce))
        cache.set_snapshot("n", snap("2", {"a": 1, "b": 3}))  # only b changes
        r = c.recv()
        assert [x.name for x in r.resources] == ["b"] and not r.removed_resources
        c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, response_nonce=r.nonce))
        cache.set_snapshot("n", snap("3", {"a": 1}))  # b goes away
        r = c.recv()
        assert not r.resources and list(r.removed_resources) == ["b"]
    finally:
        c.close()
