"""Find a pod's network namespace on this node from the kubelet's cgroup of the pod.

The kubelet names a pod's cgroup after its UID: `pod<uid>` with the cgroupfs driver,
`kubepods-<qos>-pod<uid with _ for ->.slice` with the systemd driver. Any process in that subtree
(the sandbox's pause process, from before the pod gets its IP) is in the pod's network namespace.
The kernel knows a pod by its namespace's cookie (the service LB's "keep the service address" list,
the mesh's local_pods); the node Envoy creates a pod's listeners inside it through a path to it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from accel.servicelb import netns_cookie
from accel.state.model import ObjectKey, Pod
from sockops_bpf.cgroup import cgroup2_root

MAX_DEPTH = 6  # kubepods.slice/kubepods-burstable.slice/...pod<uid>.slice: the pod is never deeper


def pod_cgroup(uid: str, root: Path | None = None) -> Path | None:
    if not uid:
        return None
    root = root or cgroup2_root()
    wanted = (f"pod{uid}", f"pod{uid.replace('-', '_')}")
    base_depth = len(root.parts)
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            name = d.removesuffix(".slice")
            if name in wanted or name.endswith(("-" + wanted[0], "-" + wanted[1])):
                return Path(dirpath) / d
        if len(Path(dirpath).parts) - base_depth >= MAX_DEPTH:
            dirnames.clear()
    return None


def first_pid(cgroup: Path) -> int | None:
    for dirpath, _, files in os.walk(cgroup):
        if "cgroup.procs" in files:
            try:
                pids = (Path(dirpath) / "cgroup.procs").read_text().split()
            except OSError:
                continue
            if pids:
                return int(pids[0])
    return None


@dataclass(frozen=True, slots=True)
class PodNetns:
    cookie: int  # what bpf_get_netns_cookie() says for the pod's sockets
    path: str  # /proc/<pid>/ns/net of a process of the pod (its sandbox): Envoy opens it to listen inside


def pod_netns(pod: Pod) -> PodNetns | None:
    """The pod's network namespace, or None while the pod has no process here yet."""
    cg = pod_cgroup(pod.uid)
    pid = first_pid(cg) if cg is not None else None
    if pid is None:
        return None
    path = f"/proc/{pid}/ns/net"
    try:
        return PodNetns(netns_cookie(path), path)
    except OSError:
        return None  # the process went away meanwhile; the next change of the pod tries again


def pod_netns_cookie(pod: Pod) -> int | None:
    ns = pod_netns(pod)
    return ns.cookie if ns is not None else None


class PodNetnsCache:
    """Namespaces of this node's pods, found once per pod (a walk of the cgroup tree each time would
    cost O(cgroups) per change) and shared by the reconcilers (apply thread) and the xDS bridge (its
    own thread). A cached entry whose process is gone is looked up again."""

    def __init__(self, lookup: Callable[[Pod], PodNetns | None] = pod_netns) -> None:
        self._lookup = lookup
        self._known: dict[ObjectKey, tuple[str, PodNetns]] = {}  # pod key -> (uid, namespace)
        self._lock = threading.Lock()

    def get(self, pod: Pod) -> PodNetns | None:
        with self._lock:
            hit = self._known.get(pod.key)
        if hit is not None and hit[0] == pod.uid and os.path.exists(hit[1].path):
            return hit[1]
        found = self._lookup(pod)
        with self._lock:
            if found is None:
                self._known.pop(pod.key, None)
            else:
                self._known[pod.key] = (pod.uid, found)
        return found

    def cached(self, key: ObjectKey) -> PodNetns | None:
        """What was found last for a pod, without looking (for readers outside the apply thread)."""
        with self._lock:
            hit = self._known.get(key)
        return hit[1] if hit is not None else None

    def forget(self, key: ObjectKey) -> None:
        with self._lock:
            self._known.pop(key, None)
