"""The CA follows only what its authorization needs (pods and namespaces): its RBAC allows nothing
else, and on a real API server a kind it may not list kept its first sync from completing (found by
the e2e node: the CA waited out --sync-timeout and logged 403s forever)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from accel.commands.ca import CA_KINDS, _StateSink
from accel.kubefake import FakeApiServer
from accel.sources.kube import KubeSource, load_api_client
from accel.state.model import Kind
from accel.state.store import ClusterState

pytestmark = pytest.mark.unit


def test_ca_source_lists_and_watches_only_pods_and_namespaces(tmp_path: Path) -> None:
    with FakeApiServer() as srv:
        srv.apply({"kind": "Namespace", "metadata": {"name": "shop"}})
        srv.apply({"kind": "Pod", "metadata": {"name": "a", "namespace": "shop"},
                   "spec": {"nodeName": "n1", "serviceAccountName": "web"},
                   "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}})
        srv.apply({"kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                   "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80, "protocol": "TCP"}]}})
        api = load_api_client(str(srv.write_kubeconfig(tmp_path / "kubeconfig")))
        source = KubeSource(api, only=CA_KINDS)
        state = ClusterState()
        sink = _StateSink(state)
        stop = threading.Event()
        t = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
        t.start()
        try:
            assert sink.synced_event.wait(10), "the CA's pod source never synced"
            assert sorted(source.kinds) == sorted(CA_KINDS)
            assert {w.pod.name for w in state.workloads()} == {"a"}
            others = [k for k in Kind if k not in CA_KINDS]
            asked = {k: srv.count(f"list {k}") + srv.count(f"watch {k}") for k in others}
            assert not any(asked.values()), f"the CA asked for kinds it has no RBAC for: {asked}"
        finally:
            stop.set()
            t.join(10)
