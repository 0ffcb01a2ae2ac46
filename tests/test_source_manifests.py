"""The manifest-folder source: files added, changed, deleted; bad files reported, others still apply."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from accel.sources.manifests import ManifestSource
from accel.state.model import Event, EventType, Kind, ObjectKey
from accel.state.store import ClusterState
from tests.waiting import wait_until

pytestmark = pytest.mark.unit


class ListSink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.problems: list[tuple[str, str]] = []
        self.was_synced = threading.Event()

    def event(self, ev: Event) -> None:
        self.events.append(ev)

    def synced(self) -> None:
        self.was_synced.set()

    def problem(self, reason: str, message: str) -> None:
        self.problems.append((reason, message))

    def stat(self, name: str, kind: str) -> None:
        pass

    def drain_into(self, st: ClusterState) -> None:
        st.apply(self.events)
        self.events = []


POD = """apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop}}
spec: {{nodeName: n1, serviceAccountName: cart}}
status: {{phase: Running, podIP: {ip}}}
"""
SVC = """apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.0.5, selector: {app: cart}, ports: [{port: 80, targetPort: 8080}]}
"""


def write(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a distinct mtime even within one tick


def pods(st: ClusterState) -> dict[str, tuple[str, ...]]:
    return {k.name: r.ips for k, r in st.records(Kind.POD).items()}  # type: ignore[union-attr]


def test_add_change_delete_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", POD.format(name="p1", ip="10.0.0.1") + "---\n" + SVC)
    write(tmp_path / "b.yml", POD.format(name="p2", ip="10.0.0.2") + "---\n---\n")
    (tmp_path / "README.md").write_text("not a manifest, not read")
    src, sink, st = ManifestSource(tmp_path), ListSink(), ClusterState()
    src.scan(sink)
    sink.drain_into(st)
    assert pods(st) == {"p1": ("10.0.0.1",), "p2": ("10.0.0.2",)}
    assert ObjectKey(Kind.SERVICE, "shop", "cart") in st.records(Kind.SERVICE)
    # Change one object in a file: exactly one MODIFIED event.
    write(tmp_path / "b.yml", POD.format(name="p2", ip="10.0.0.22"))
    src.scan(sink)
    assert [(e.type, e.key.name) for e in sink.events] == [(EventType.MODIFIED, "p2")]
    sink.drain_into(st)
    # Remove an object from a file, then a whole file.
    write(tmp_path / "a.yaml", SVC)
    src.scan(sink)
    assert [(e.type, e.key.name) for e in sink.events] == [(EventType.DELETED, "p1")]
    (tmp_path / "b.yml").unlink()
    src.scan(sink)
    sink.drain_into(st)
    assert pods(st) == {} and len(st.records(Kind.SERVICE)) == 1
    assert sink.problems == []


def test_invalid_files_are_reported_and_others_apply(tmp_path: Path) -> None:
    write(tmp_path / "good.yaml", POD.format(name="p1", ip="10.0.0.1"))
    write(tmp_path / "broken.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: [unclosed\n")
    write(tmp_path / "prose.yaml", "just some words\n---\n" + POD.format(name="p3", ip="10.0.0.3"))
    write(tmp_path / "bad-ip.yaml", POD.format(name="p4", ip="999.1.1.1"))
    write(tmp_path / "deploy.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n")
    src, sink, st = ManifestSource(tmp_path), ListSink(), ClusterState()
    src.scan(sink)
    sink.drain_into(st)
    assert pods(st) == {"p1": ("10.0.0.1",), "p3": ("10.0.0.3",)}
    by_reason = {r: m for r, m in sink.problems}
    assert set(by_reason) == {"manifest_invalid", "manifest_not_kubernetes"}
    assert f"file={tmp_path / 'broken.yaml'}" in by_reason["manifest_invalid"]
    assert "while parsing" in by_reason["manifest_invalid"] or "expected" in by_reason["manifest_invalid"]
    messages = [m for r, m in sink.problems if r == "manifest_not_kubernetes"]
    assert any("prose.yaml" in m and "document=0" in m and "not a Kubernetes object" in m for m in messages)
    assert any("bad-ip.yaml" in m and "'999.1.1.1' is not an IP address" in m for m in messages)
    # A file that breaks later keeps its last good objects; fixed, it applies again.
    sink.problems.clear()
    write(tmp_path / "good.yaml", "kind: Pod\n  bad: indentation: here\n")
    src.scan(sink)
    sink.drain_into(st)
    assert "p1" in pods(st) and [r for r, _ in sink.problems] == ["manifest_invalid"]
    write(tmp_path / "good.yaml", POD.format(name="p1", ip="10.0.0.11"))
    src.scan(sink)
    sink.drain_into(st)
    assert pods(st)["p1"] == ("10.0.0.11",)


def test_duplicate_object_in_two_files_keeps_the_first(tmp_path: Path) -> None:
    write(tmp_path / "1.yaml", POD.format(name="p1", ip="10.0.0.1"))
    write(tmp_path / "2.yaml", POD.format(name="p1", ip="10.0.0.2"))
    src, sink, st = ManifestSource(tmp_path), ListSink(), ClusterState()
    src.scan(sink)
    sink.drain_into(st)
    assert pods(st) == {"p1": ("10.0.0.1",)}
    assert [r for r, _ in sink.problems] == ["manifest_duplicate"]


def test_run_signals_synced_and_follows_changes(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", POD.format(name="p1", ip="10.0.0.1"))
    src, sink = ManifestSource(tmp_path, poll_interval=0.02), ListSink()
    stop = threading.Event()
    t = threading.Thread(target=src.run, args=(sink, stop))
    t.start()
    try:
        assert sink.was_synced.wait(10)
        assert [e.key.name for e in sink.events] == ["p1"]
        write(tmp_path / "b.yaml", POD.format(name="p2", ip="10.0.0.2"))
        wait_until(lambda: len(sink.events) == 2, 10, "the new file's event")
        assert [e.key.name for e in sink.events] == ["p1", "p2"]
    finally:
        stop.set()
        t.join(5)
