"""Find a pod's network namespace on this node from the kubelet's cgroup of the pod.

The kubelet names a pod's cgroup after its UID: `pod<uid>` with the cgroupfs driver,
`kubepods-<qos>-pod<uid with _ for ->.slice` with the systemd driver. Any process in that subtree
(the sandbox's pause process, from before the pod gets its IP) is in the pod's network namespace.
The service LB keys "keep the service address" (Istio, meshaccel.io/exclude) by namespace cookie.
"""

from __future__ import annotations

import os
from pathlib import Path

from accel.servicelb import netns_cookie
from accel.state.model import Pod
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


def pod_netns_cookie(pod: Pod) -> int | None:
    """The cookie of the pod's network namespace, or None while the pod has no process here yet."""
    cg = pod_cgroup(pod.uid)
    pid = first_pid(cg) if cg is not None else None
    if pid is None:
        return None
    try:
        return netns_cookie(f"/proc/{pid}/ns/net")
    except OSError:
        return None  # the process went away meanwhile; the next change of the pod tries again
