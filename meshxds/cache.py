"""Snapshot cache: immutable versioned sets of Envoy resources per node id.

This module knows resources (what a cluster, an endpoint set or a listener is, which names one
resource makes the client ask for) and nothing about gRPC or streams. Updating config = building a
new `Snapshot` and `set_snapshot`-ing it; watchers (the server's streams) are told which node changed.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2

_PREFIX = "type.googleapis.com/"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# Push order. Secrets first: listeners and clusters that name them wait (warm) until they arrive, and
# nothing names a secret's consumer. Then CDS -> EDS -> LDS -> RDS so nothing references a resource
# the client has not got yet; removals go after all of that (the server's job).
ORDER: tuple[str, ...] = (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)
# In State-of-the-World a missing Listener or Cluster means "deleted"; other types are only named.
FULL_STATE: frozenset[str] = frozenset({LISTENER, CLUSTER})
SHORT_NAMES: Mapping[str, str] = MappingProxyType(
    {SECRET: "sds", CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}
)

_HCM_TYPE = _PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


@dataclass(frozen=True, slots=True)
class Entry:
    """One resource as it goes on the wire: its name, a content version and the packed message."""

    name: str
    version: str
    packed: any_pb2.Any


@dataclass(frozen=True, slots=True)
class Snapshot:
    """All resources one node should have, at one version. Build it with `Snapshot.build`."""

    version: str
    resources: Mapping[str, Mapping[str, Entry]]
    # Cluster name -> the EDS name it subscribes to; listener name -> RDS names it subscribes to.
    eds_of_cluster: Mapping[str, str] = field(default_factory=dict)
    rds_of_listener: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        version: str,
        *,
        clusters: Iterable[cluster_pb2.Cluster] = (),
        endpoints: Iterable[endpoint_pb2.ClusterLoadAssignment] = (),
        listeners: Iterable[listener_pb2.Listener] = (),
        routes: Iterable[route_pb2.RouteConfiguration] = (),
        secrets: Iterable[secret_pb2.Secret] = (),
    ) -> Snapshot:
        if not version:
            raise ValueError("snapshot version must be a non-empty string")
        clusters, listeners = list(clusters), list(listeners)
        by_type: dict[str, Mapping[str, Entry]] = {
            CLUSTER: _entries(CLUSTER, clusters, "name"),
            ENDPOINT: _entries(ENDPOINT, endpoints, "cluster_name"),
            LISTENER: _entries(LISTENER, listeners, "name"),
            ROUTE: _entries(ROUTE, routes, "name"),
            SECRET: _entries(SECRET, secrets, "name"),
        }
        eds = {
            c.name: (c.eds_cluster_config.service_name or c.name)
            for c in clusters
            if c.WhichOneof("cluster_discovery_type") == "type" and c.type == cluster_pb2.Cluster.EDS
        }
        rds = {lis.name: frozenset(_rds_names(lis)) for lis in listeners}
        return cls(
            version=version,
            resources=MappingProxyType(by_type),
            eds_of_cluster=MappingProxyType(eds),
            rds_of_listener=MappingProxyType(rds),
        )

    def entries(self, type_url: str) -> Mapping[str, Entry]:
        return self.resources.get(type_url, _EMPTY)

    def dependents(self, type_url: str, names: Iterable[str]) -> tuple[str, set[str]] | None:
        """For changed clusters/listeners: the EDS/RDS names a client re-requests when they change."""
        if type_url == CLUSTER:
            return ENDPOINT, {self.eds_of_cluster[n] for n in names if n in self.eds_of_cluster}
        if type_url == LISTENER:
            return ROUTE, {r for n in names for r in self.rds_of_listener.get(n, ())}
        return None


_EMPTY: Mapping[str, Entry] = MappingProxyType({})


# --- Building snapshots from resource bundles ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resources:
    """A bundle of Envoy resources, as a translation produces them (secrets come separately)."""

    clusters: tuple[cluster_pb2.Cluster, ...] = ()
    endpoints: tuple[endpoint_pb2.ClusterLoadAssignment, ...] = ()
    listeners: tuple[listener_pb2.Listener, ...] = ()
    routes: tuple[route_pb2.RouteConfiguration, ...] = ()
    problems: tuple[str, ...] = field(default=())  # one line each: what was skipped and why


def snapshot_of(resources: Resources, secrets: Iterable[secret_pb2.Secret] = (), version: str = "") -> Snapshot:
    """A Snapshot of `resources`; without `version`, one derived from the content (same model, same version)."""
    snap = Snapshot.build("pending", clusters=resources.clusters, endpoints=resources.endpoints,
                          listeners=resources.listeners, routes=resources.routes, secrets=secrets)
    if not version:
        h = hashlib.blake2b(digest_size=8)
        for type_url in sorted(snap.resources):
            for name, e in sorted(snap.entries(type_url).items()):
                h.update(f"{type_url}\0{name}\0{e.version}\n".encode())
        version = h.hexdigest()
    return Snapshot(version, snap.resources, snap.eds_of_cluster, snap.rds_of_listener)


def _entries(type_url: str, messages: Iterable[Any], name_field: str) -> Mapping[str, Entry]:
    out: dict[str, Entry] = {}
    expected = type_url.removeprefix(_PREFIX)
    for msg in messages:
        if msg.DESCRIPTOR.full_name != expected:
            raise TypeError(f"expected {expected}, got {msg.DESCRIPTOR.full_name}")
        name = getattr(msg, name_field)
        if not name:
            raise ValueError(f"{expected} without a {name_field}")
        if name in out:
            raise ValueError(f"duplicate {expected} named {name!r}")
        raw = msg.SerializeToString(deterministic=True)
        packed = any_pb2.Any(type_url=type_url, value=raw)
        out[name] = Entry(name=name, version=hashlib.blake2b(raw, digest_size=8).hexdigest(), packed=packed)
    return MappingProxyType(out)


def _rds_names(listener: listener_pb2.Listener) -> Iterable[str]:
    chains = [*listener.filter_chains]
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for f in chain.filters:
            if f.typed_config.type_url == _HCM_TYPE:
                hcm = http_connection_manager_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                if hcm.WhichOneof("route_specifier") == "rds":
                    yield hcm.rds.route_config_name


Watcher = Callable[[str], None]


class SnapshotCache:
    """Thread-safe map node id -> current Snapshot, with change notification."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, set[Watcher]] = {}

    def set_snapshot(self, node_id: str, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshots[node_id] = snapshot
            watchers = list(self._watchers.get(node_id, ()))
        for w in watchers:
            w(node_id)

    def get(self, node_id: str) -> Snapshot | None:
        with self._lock:
            return self._snapshots.get(node_id)

    def clear(self, node_id: str) -> None:
        with self._lock:
            self._snapshots.pop(node_id, None)
            watchers = list(self._watchers.get(node_id, ()))
        for w in watchers:
            w(node_id)

    def node_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._snapshots)

    def watch(self, node_id: str, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher(node_id)` on every change for that node; returns the function that stops it.
        Watchers run on the thread that set the snapshot, so they must only schedule work."""
        with self._lock:
            self._watchers.setdefault(node_id, set()).add(watcher)

        def cancel() -> None:
            with self._lock:
                ws = self._watchers.get(node_id)
                if ws is not None:
                    ws.discard(watcher)
                    if not ws:
                        del self._watchers[node_id]

        return cancel
