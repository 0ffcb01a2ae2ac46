"""The BPF-map reconciler for the local endpoint map: pod IP (text, v4 or v6) -> identity u32 for
the pods scheduled on this node (not hostNetwork, not excluded, not finished).

It keeps a mirror of what it believes the map holds and writes only differences. Until the first
full sync it does not touch the map at all: after an agent restart the kernel keeps using what is
pinned. On the sync it reads the map once and corrects it entry by entry (never a flush), so
established fast-path connections never see a gap.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import MutableMapping

from accel.metrics import Metrics
from accel.state.model import ChangeSet, ObjectKey, Workload
from accel.state.store import ClusterState

log = logging.getLogger(__name__)

MAP_NAME = "local_endpoints"


def _owned(ip: str) -> bool:
    """Loopback keys are never pod IPs: whoever set them up (the lab) keeps them; we never touch them."""
    try:
        return not ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return True


def eligible(w: Workload, node: str) -> bool:
    p = w.pod
    return p.node == node and not p.host_network and not w.excluded and p.phase not in ("Succeeded", "Failed")


class LocalEndpointsReconciler:
    def __init__(self, node: str, table: MutableMapping[str, int], metrics: Metrics | None = None) -> None:
        self.node = node
        self.table = table
        self.metrics = metrics
        # ip -> {pod key: identity}; more than one claim only while an IP is being reused.
        self._claims: dict[str, dict[ObjectKey, int]] = {}
        self._mirror: dict[str, int] = {}  # what the map holds, as far as we know
        self._retry: set[str] = set()  # IPs whose last write failed
        self.synced = False
        self.last_applied = 0.0  # time.monotonic() of the last map write (or sync)
        self.state: ClusterState | None = None  # set by the agent; only full-resync baselines read it

    def desired(self) -> dict[str, int]:
        # The newest claim wins (dicts keep insertion order).
        return {ip: next(reversed(c.values())) for ip, c in self._claims.items() if c}

    def _want(self, ip: str) -> int | None:
        c = self._claims.get(ip)
        return next(reversed(c.values())) if c else None

    def on_change(self, cs: ChangeSet) -> None:
        touched: set[str] = set(self._retry)
        self._retry.clear()
        for wc in cs.workloads:
            if wc.old is not None and eligible(wc.old, self.node):
                for ip in wc.old.pod.ips:
                    claims = self._claims.get(ip)
                    if claims is not None:
                        claims.pop(wc.key, None)
                        if not claims:
                            del self._claims[ip]
                    touched.add(ip)
            if wc.new is not None and eligible(wc.new, self.node):
                for ip in wc.new.pod.ips:
                    claims = self._claims.setdefault(ip, {})
                    claims.pop(wc.key, None)
                    claims[wc.key] = wc.new.identity.number
                    touched.add(ip)
        if not self.synced:
            if cs.synced:
                self.full_correction()
            return
        for ip in sorted(touched):
            self._put(ip, self._want(ip))
        self._gauge()

    def full_correction(self) -> None:
        """Read the map once and make it equal to the model, entry by entry."""
        t0 = time.perf_counter()
        actual = {ip: ident for ip, ident in self.table.items() if _owned(ip)}
        self._mirror = dict(actual)
        want = self.desired()
        stale = [ip for ip in actual if ip not in want]
        changed = [ip for ip, ident in want.items() if actual.get(ip) != ident]
        for ip in changed:
            self._put(ip, want[ip])
        for ip in stale:
            self._put(ip, None)
        self.synced = True
        self._gauge()
        log.info("event=map_corrected map=%s entries=%d written=%d removed=%d kept=%d seconds=%.4f",
                 MAP_NAME, len(want), len(changed), len(stale), len(want) - len(changed),
                 time.perf_counter() - t0)

    def _put(self, ip: str, ident: int | None) -> None:
        if self._mirror.get(ip) == ident:
            return
        try:
            if ident is None:
                self.table.pop(ip, None)
                self._mirror.pop(ip, None)
                op = "delete"
            else:
                self.table[ip] = ident
                self._mirror[ip] = ident
                op = "update"
        except (OSError, ValueError) as e:
            log.error("event=map_write_failed map=%s ip=%s error=%r action=retry_next_change", MAP_NAME, ip, str(e))
            self._retry.add(ip)
            if self.metrics:
                self.metrics.errors.labels("reconcile", "map_write").inc()
            return
        self.last_applied = time.monotonic()
        if self.metrics:
            self.metrics.map_updates.labels(MAP_NAME, op).inc()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.map_entries.labels(MAP_NAME).set(len(self._mirror))

    def matches_model(self) -> bool:
        """The map holds exactly what the model wants (reads the whole map: tests and status only)."""
        return {ip: v for ip, v in self.table.items() if _owned(ip)} == self.desired()
