"""Address-keyed BPF maps that follow the model's pods: one reconciler shape, two maps.

- `LocalEndpointsReconciler`: local_endpoints, pod IP (text, v4 or v6) -> identity for the pods
  scheduled on this node (not hostNetwork, not excluded, not finished): the fast path splices sockets
  whose two ends are there. Loopback and the node's own addresses are added as fixed entries when the
  agent asks (within a pod, and the legs between an application and the node Envoy: spliced for their
  small exchanges only, maps.h "proxy leg").
- `accel.mesh.IpcacheReconciler`: ipcache, every pod of the cluster -> identity and mesh flags.

Each keeps a mirror of what it believes the map holds and writes only differences. Until the first full
sync it does not touch the map at all: after an agent restart the kernel keeps using what is pinned.
On the sync it reads the map once and corrects it entry by entry (never a flush), so established
fast-path connections never see a gap. An address claimed by two pods (an IP being reused) goes to
the newest claim, and back to the older one when the newer goes.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Generic, TypeVar

from accel.metrics import Metrics
from accel.state.model import ChangeSet, ObjectKey, Workload
from accel.state.store import ClusterState

log = logging.getLogger(__name__)

V = TypeVar("V")


def _loopback(key: str) -> bool:
    try:
        return ipaddress.ip_network(key, strict=False).network_address.is_loopback
    except ValueError:
        return False


def on_node(w: Workload, node: str) -> bool:
    """A pod of this node that the data path serves: scheduled here, own network namespace, not
    excluded (meshaccel.io/exclude), not finished."""
    p = w.pod
    return p.node == node and not p.host_network and not w.excluded and p.phase not in ("Succeeded", "Failed")


class AddressMapReconciler(Generic[V]):
    """Keeps `table` equal to: the fixed entries, plus `entries_of(w)` for every workload of the model."""

    map_name = "addresses"

    def __init__(self, table: MutableMapping[str, V], entries_of: Callable[[Workload], Mapping[str, V]],
                 metrics: Metrics | None = None, fixed: Mapping[str, V] | None = None) -> None:
        self.table = table
        self.entries_of = entries_of
        self.metrics = metrics
        self.fixed = dict(fixed or {})
        # key -> {pod key: value}; more than one claim only while an address is being reused.
        self._claims: dict[str, dict[ObjectKey, V]] = {}
        self._mirror: dict[str, V] = {}  # what the map holds, as far as we know
        self._retry: set[str] = set()  # keys whose last write failed
        self.synced = False
        self.last_applied = 0.0  # time.monotonic() of the last map write (or sync)
        self.state: ClusterState | None = None  # set by the agent; only full-resync baselines read it

    def _owned(self, key: str, value: V) -> bool:
        """Entries not ours are never touched: loopback keys we were not given (the lab's)."""
        return key in self.fixed or not _loopback(key)

    def desired(self) -> dict[str, V]:
        # The newest claim wins (dicts keep insertion order); the fixed entries under them.
        want = dict(self.fixed)
        want.update({k: next(reversed(c.values())) for k, c in self._claims.items() if c})
        return want

    def _want(self, key: str) -> V | None:
        c = self._claims.get(key)
        return next(reversed(c.values())) if c else self.fixed.get(key)

    def on_change(self, cs: ChangeSet) -> None:
        touched: set[str] = set(self._retry)
        self._retry.clear()
        for wc in cs.workloads:
            if wc.old is not None:
                for key in self.entries_of(wc.old):
                    claims = self._claims.get(key)
                    if claims is not None:
                        claims.pop(wc.key, None)
                        if not claims:
                            del self._claims[key]
                    touched.add(key)
            if wc.new is not None:
                for key, value in self.entries_of(wc.new).items():
                    claims = self._claims.setdefault(key, {})
                    claims.pop(wc.key, None)
                    claims[wc.key] = value
                    touched.add(key)
        if not self.synced:
            if cs.synced:
                self.full_correction()
            return
        for key in sorted(touched):
            self._put(key, self._want(key))
        self._gauge()

    def full_correction(self) -> None:
        """Read the map once and make it equal to the model, entry by entry."""
        t0 = time.perf_counter()
        actual = {k: v for k, v in self.table.items() if self._owned(k, v)}
        self._mirror = dict(actual)
        want = self.desired()
        stale = [k for k in actual if k not in want]
        changed = [k for k, v in want.items() if actual.get(k) != v]
        for k in changed:
            self._put(k, want[k])
        for k in stale:
            self._put(k, None)
        self.synced = True
        self._gauge()
        log.info("event=map_corrected map=%s entries=%d written=%d removed=%d kept=%d seconds=%.4f",
                 self.map_name, len(want), len(changed), len(stale), len(want) - len(changed),
                 time.perf_counter() - t0)

    def _put(self, key: str, value: V | None) -> None:
        if self._mirror.get(key) == value:
            return
        try:
            if value is None:
                self.table.pop(key, None)
                self._mirror.pop(key, None)
                op = "delete"
            else:
                self.table[key] = value
                self._mirror[key] = value
                op = "update"
        except (OSError, ValueError) as e:
            log.error("event=map_write_failed map=%s key=%s error=%r action=retry_next_change", self.map_name, key,
                      str(e))
            self._retry.add(key)
            if self.metrics:
                self.metrics.errors.labels("reconcile", "map_write").inc()
            return
        self.last_applied = time.monotonic()
        if self.metrics:
            self.metrics.map_updates.labels(self.map_name, op).inc()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.map_entries.labels(self.map_name).set(len(self._mirror))

    def matches_model(self) -> bool:
        """The map holds exactly what the model wants (reads the whole map: tests and status only)."""
        return {k: v for k, v in self.table.items() if self._owned(k, v)} == self.desired()


class LocalEndpointsReconciler(AddressMapReconciler[int]):
    """local_endpoints: this node's pod addresses -> identity. `fixed`: e.g. loopback and the node's own
    addresses (so the app <-> node Envoy legs are spliced while they exchange little, maps.h "proxy leg")."""

    map_name = "local_endpoints"

    def __init__(self, node: str, table: MutableMapping[str, int], metrics: Metrics | None = None,
                 fixed: Mapping[str, int] | None = None) -> None:
        self.node = node

        def entries(w: Workload) -> dict[str, int]:
            return {ip: w.security_identity for ip in w.pod.ips} if on_node(w, node) else {}

        super().__init__(table, entries, metrics, fixed)
