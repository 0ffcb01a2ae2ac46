"""The mesh as the kernel sees it (maps.h "The mesh"), following the model:

- ipcache (`IpcacheReconciler`): every pod address of the cluster -> its identity and flags: on this
  node (LOCAL), enrolled in mTLS so connections to it from enrolled pods go by HBONE (MTLS), strict
  (STRICT: plaintext from other nodes dropped); plus this node's own addresses (HOST).
- local_pods (`LocalPodsReconciler`): this node's pods by network-namespace cookie -> identity, with
  POD_F_CAPTURE once this node's Envoy serves the pod's capture listener (the xDS bridge says when:
  `set_capture_ready`), so connect() never sends a connection to a listener that is not there yet.

Who is enrolled is decided here once (`sends_hbone`, `strict_inbound`); the xDS translation asks the
same functions.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Protocol

from accel.metrics import Metrics
from accel.podns import PodNetnsCache
from accel.policy_agent import owned_by_policy
from accel.reconcile import AddressMapReconciler, on_node
from accel.state.model import ChangeSet, MtlsMode, ObjectKey, Workload
from accel.state.store import ClusterState
from sockops_bpf.layout import IDENTITY_HOST, IPC_F_HOST, IPC_F_LOCAL, IPC_F_MTLS, IPC_F_STRICT, POD_F_CAPTURE
from sockops_bpf.maps import AddressInfo, PodInfo

log = logging.getLogger(__name__)


class MeshTables(Protocol):
    """What the reconcilers write: sockops_bpf.maps.MeshMaps (pinned maps) satisfies it."""

    ipcache: MutableMapping[str, AddressInfo]
    local_pods: MutableMapping[int, PodInfo]


def kernel_identity(w: Workload) -> int:
    """The number the kernel knows a workload by (ipcache, local_pods, local_endpoints, the policy map):
    its security identity (namespace, service account, labels), which policy selectors are functions of.
    The SPIFFE number (w.identity) is for certificates."""
    return w.security_identity


def sends_hbone(w: Workload) -> bool:
    """Enrolled in transparent mTLS: its connections to enrolled pods on other nodes, and theirs to it, go
    through HBONE. Istio ambient pods speak HBONE through their ztunnel, so they count as peers; pods
    with an Istio sidecar speak Istio's own mTLS, and excluded pods are left alone."""
    if w.excluded or w.pod.host_network:
        return False
    if w.istio_ambient:
        return True
    return w.mtls is not MtlsMode.DISABLE and not w.istio_sidecar


def strict_inbound(w: Workload) -> bool:
    """Refuses plaintext from other nodes (only HBONE is accepted)."""
    return sends_hbone(w) and not w.istio_ambient and w.mtls is MtlsMode.STRICT


def host_key(ip: str) -> str:
    """An ipcache key for one address: a /32 or /128 network in text."""
    a = ipaddress.ip_address(ip)
    return f"{a}/{a.max_prefixlen}"


class IpcacheReconciler(AddressMapReconciler[AddressInfo]):
    map_name = "ipcache"

    def __init__(self, node: str, table: MutableMapping[str, AddressInfo], metrics: Metrics | None = None,
                 node_addresses: Iterable[str] = ()) -> None:
        self.node = node

        def entries(w: Workload) -> dict[str, AddressInfo]:
            p = w.pod
            if p.host_network or p.phase in ("Succeeded", "Failed"):
                return {}
            flags = IPC_F_LOCAL if p.node == node else 0
            if sends_hbone(w):
                flags |= IPC_F_MTLS
            if strict_inbound(w):
                flags |= IPC_F_STRICT
            info = AddressInfo(kernel_identity(w), flags)
            return {host_key(ip): info for ip in p.ips}

        fixed = {host_key(ip): AddressInfo(IDENTITY_HOST, IPC_F_HOST) for ip in node_addresses}
        super().__init__(table, entries, metrics, fixed)

    def _owned(self, key: str, value: AddressInfo) -> bool:
        """The policy compiler's CIDR entries share the map; their identities are its own range."""
        return not owned_by_policy(value) and super()._owned(key, value)


class LocalPodsReconciler:
    """local_pods: netns cookie -> (identity, POD_F_*) for the pods of this node. A pod whose namespace
    cannot be found yet (no process in its cgroup) is retried on every change and when idle (`retry`)."""

    map_name = "local_pods"

    def __init__(self, node: str, table: MutableMapping[int, PodInfo], netns: PodNetnsCache,
                 metrics: Metrics | None = None) -> None:
        self.node = node
        self.table = table
        self.netns = netns
        self.metrics = metrics
        self.state: ClusterState | None = None  # set by the agent
        self.capture_ready: frozenset[ObjectKey] = frozenset()
        self._pods: dict[ObjectKey, Workload] = {}  # this node's served pods
        self._written: dict[ObjectKey, tuple[int, PodInfo]] = {}  # pod -> (cookie, what we wrote)
        self.unresolved: set[ObjectKey] = set()  # this node's pods whose namespace is not found yet
        self.synced = False

    def on_change(self, cs: ChangeSet) -> None:
        touched: set[ObjectKey] = set(self.unresolved)
        for wc in cs.workloads:
            if wc.new is not None and on_node(wc.new, self.node):
                self._pods[wc.key] = wc.new
            else:
                self._pods.pop(wc.key, None)
            touched.add(wc.key)
        if not self.synced:
            if not cs.synced:
                return
            self._adopt()
            touched |= self._pods.keys()
        for key in sorted(touched):
            self._sync(key)
        if self.metrics:
            self.metrics.map_entries.labels(self.map_name).set(len(self._written))

    def set_capture_ready(self, pods: Iterable[ObjectKey]) -> None:
        """The pods whose capture listener this node's Envoy has (ACKed); connect() captures only theirs."""
        ready = frozenset(pods)
        changed = ready ^ self.capture_ready
        self.capture_ready = ready
        if self.synced:
            for key in sorted(changed):
                self._sync(key)

    def retry(self) -> int:
        """Look again for namespaces not found yet; the number still missing."""
        for key in sorted(self.unresolved):
            self._sync(key)
        return len(self.unresolved)

    def _adopt(self) -> None:
        """First full sync: cookies in the map that no pod of ours claims any more are removed (their
        namespaces are gone); the rest is rewritten by _sync as needed. Nothing is flushed, and a pod
        the previous agent captured stays captured: its Envoy listener outlived that agent, and the
        bridge withdraws it if the new snapshot does not hold it."""
        have = dict(self.table.items())
        claimed = set()
        captured = set(self.capture_ready)
        for key, w in self._pods.items():
            ns = self.netns.get(w.pod)
            if ns is None:
                continue
            claimed.add(ns.cookie)
            old = have.get(ns.cookie)
            if old is not None and old.flags & POD_F_CAPTURE:
                captured.add(key)
        self.capture_ready = frozenset(captured)
        for cookie in [c for c in have if c not in claimed]:
            self.table.pop(cookie, None)
        self.synced = True

    def _want(self, key: ObjectKey) -> tuple[int, PodInfo] | None:
        w = self._pods.get(key)
        if w is None:
            self.unresolved.discard(key)
            return None
        ns = self.netns.get(w.pod)
        if ns is None:
            if key not in self.unresolved:
                log.info("event=pod_netns_unknown pod=%s action=retry", key)
            self.unresolved.add(key)
            return None
        self.unresolved.discard(key)
        flags = POD_F_CAPTURE if key in self.capture_ready and sends_hbone(w) else 0
        ip4 = next((ip for ip in w.pod.ips if ":" not in ip), "")
        ip6 = next((ip for ip in w.pod.ips if ":" in ip), "")
        return ns.cookie, PodInfo(kernel_identity(w), flags, ip4, ip6)

    def _sync(self, key: ObjectKey) -> None:
        want = self._want(key)
        have = self._written.get(key)
        if want == have:
            return
        try:
            if have is not None and (want is None or want[0] != have[0]):
                self.table.pop(have[0], None)
                del self._written[key]
            if want is not None:
                self.table[want[0]] = want[1]
                self._written[key] = want
        except OSError as e:
            log.error("event=map_write_failed map=%s pod=%s error=%r action=retry", self.map_name, key, str(e))
            self.unresolved.add(key)
            if self.metrics:
                self.metrics.errors.labels("mesh", "map_write").inc()
            return
        if self.metrics:
            self.metrics.map_updates.labels(self.map_name, "update" if want else "delete").inc()

    def written(self) -> Mapping[ObjectKey, tuple[int, PodInfo]]:
        return dict(self._written)
