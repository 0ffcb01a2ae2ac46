"""The local endpoint map reconciler: differences only, nothing before the sync, correction in place."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import pytest

from accel.reconcile import LocalEndpointsReconciler
from accel.state.model import Event, EventType
from accel.state.parse import parse_object
from accel.state.store import ClusterState

pytestmark = pytest.mark.unit
NODE = "n1"


class RecordingMap(MutableMapping[str, int]):
    """A dict that logs every write, standing in for the pinned BPF map in unit tests."""

    def __init__(self, initial: dict[str, int] | None = None) -> None:
        self.data = dict(initial or {})
        self.ops: list[tuple[str, str]] = []

    def __getitem__(self, k: str) -> int:
        return self.data[k]

    def __setitem__(self, k: str, v: int) -> None:
        self.ops.append(("set", k))
        self.data[k] = v

    def __delitem__(self, k: str) -> None:
        self.ops.append(("del", k))
        del self.data[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def pod(name: str, ip: str, *, node: str = NODE, sa: str = "default", host_network: bool = False,
        phase: str = "Running", labels: dict | None = None) -> Event:
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns", "labels": labels or {}},
           "spec": {"nodeName": node, "serviceAccountName": sa, "hostNetwork": host_network},
           "status": {"phase": phase, "podIP": ip}}
    return Event(EventType.ADDED, parse_object(obj))


def setup(table: MutableMapping[str, int]) -> tuple[ClusterState, LocalEndpointsReconciler]:
    st = ClusterState()
    rec = LocalEndpointsReconciler(NODE, table)
    st.subscribe(rec.on_change)
    return st, rec


def test_only_pods_served_on_this_node_and_only_differences() -> None:
    table = RecordingMap()
    st, rec = setup(table)
    st.apply([pod("a", "10.0.0.1"), pod("b", "10.0.0.2", node="n2"), pod("h", "192.168.0.5", host_network=True),
              pod("done", "10.0.0.3", phase="Succeeded"), pod("x", "10.0.0.4", labels={"meshaccel.io/exclude": "true"}),
              pod("v6", "fd00::7")], synced=True)
    assert set(table.data) == {"10.0.0.1", "fd00::7"}
    ident = table.data["10.0.0.1"]
    table.ops.clear()
    st.apply([pod("c", "10.0.0.5"), pod("b", "10.0.0.2", node="n2", sa="other")])  # a remote change: no write
    assert table.ops == [("set", "10.0.0.5")]
    table.ops.clear()
    st.apply([pod("a", "10.0.0.1", sa="other")])  # identity change rewrites one entry
    assert table.ops == [("set", "10.0.0.1")] and table.data["10.0.0.1"] != ident
    table.ops.clear()
    st.apply([Event(EventType.DELETED, pod("c", "10.0.0.5").record)])
    assert table.ops == [("del", "10.0.0.5")]
    assert rec.matches_model()


def test_nothing_written_before_sync_then_corrected_in_place() -> None:
    st0, _ = setup({})
    st0.apply([pod("keep", "10.0.0.1")])
    right = st0.workload_by_ip("10.0.0.1")
    assert right is not None
    # What a previous agent left pinned: one right entry, one wrong identity, one stale pod.
    table = RecordingMap({"10.0.0.1": right.security_identity, "10.0.0.2": 12345, "10.0.0.9": 777})
    st, rec = setup(table)
    st.apply([pod("keep", "10.0.0.1"), pod("changed", "10.0.0.2"), pod("new", "10.0.0.3")])
    assert table.ops == []  # the kernel keeps serving the old entries until the model is complete
    st.apply([], synced=True)
    assert sorted(table.ops) == [("del", "10.0.0.9"), ("set", "10.0.0.2"), ("set", "10.0.0.3")]
    assert ("set", "10.0.0.1") not in table.ops and ("del", "10.0.0.1") not in table.ops  # never flushed
    assert rec.matches_model()


def test_reused_ip_goes_to_the_newest_claim_and_back() -> None:
    table = RecordingMap()
    st, rec = setup(table)
    st.apply([pod("old", "10.0.0.1", sa="a")], synced=True)
    st.apply([pod("new", "10.0.0.1", sa="b")])
    new = st.workload_by_ip("10.0.0.1")
    assert new is not None and table.data["10.0.0.1"] == new.security_identity
    st.apply([Event(EventType.DELETED, pod("new", "10.0.0.1", sa="b").record)])
    old = st.workload(pod("old", "10.0.0.1").key)
    assert old is not None and old.identity != new.identity
    assert table.data["10.0.0.1"] == old.security_identity and rec.matches_model()
    st.apply([Event(EventType.DELETED, pod("old", "10.0.0.1", sa="a").record)])
    assert table.data == {}


class FailingMap(RecordingMap):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def __setitem__(self, k: str, v: int) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        super().__setitem__(k, v)


def test_failed_write_is_retried_on_the_next_change() -> None:
    from accel.metrics import Metrics

    table = FailingMap()
    m = Metrics()
    st = ClusterState()
    rec = LocalEndpointsReconciler(NODE, table, m)
    st.subscribe(rec.on_change)
    st.apply([pod("a", "10.0.0.1")], synced=True)
    assert table.data == {} and m.errors.labels("reconcile", "map_write")._value.get() == 1
    table.fail = False
    st.apply([pod("b", "10.0.0.2")])
    assert set(table.data) == {"10.0.0.1", "10.0.0.2"} and rec.matches_model()
