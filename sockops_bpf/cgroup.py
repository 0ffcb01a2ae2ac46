"""cgroup v2: find the unified mount (never assume where it is) and resolve cgroup ids to paths."""

from __future__ import annotations

import os
from pathlib import Path

from sockops_bpf.errors import BpfError


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """The cgroup2 mount: /sys/fs/cgroup on pure v2 hosts, /sys/fs/cgroup/unified on hybrid ones."""
    found = []
    with open(mountinfo) as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split(" ", 1)[0] == "cgroup2":
                found.append(Path(pre.split()[4]))
    if not found:
        raise BpfError("no cgroup2 filesystem is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup)")
    # Prefer the shortest path (the host's own mount over bind mounts of sub-trees).
    return min(found, key=lambda p: len(str(p)))


def check_cgroup(path: Path) -> Path:
    """A cgroup-v2 directory we can attach to, or a BpfError saying what is wrong."""
    if not path.is_dir():
        raise BpfError(f"cgroup {path} does not exist; give an existing cgroup-v2 directory or omit --cgroup")
    if not (path / "cgroup.procs").exists():
        raise BpfError(f"{path} is not a cgroup directory (no cgroup.procs)")
    root = cgroup2_root()
    if not str(path.resolve()).startswith(str(root)):
        raise BpfError(f"{path} is not under the cgroup-v2 mount {root}")
    return path


def cgroup_path_by_id(cgroup_id: int) -> Path | None:
    """cgroup v2 ids are the inode numbers of the cgroup directories."""
    root = cgroup2_root()
    if os.stat(root).st_ino == cgroup_id:
        return root
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            p = Path(dirpath) / d
            try:
                if os.stat(p).st_ino == cgroup_id:
                    return p
            except OSError:
                continue
    return None
