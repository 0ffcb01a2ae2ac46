"""`accel load` and `accel uninstall`: the eBPF data path by itself (the agent calls the same loader)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sockops_bpf import loader


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("load", help="compile, pin and attach the eBPF programs (again: swap them in place)")
    p.add_argument("--instance", default="node", help="pin folder name under /sys/fs/bpf/meshaccel")
    p.add_argument("--cgroup", type=Path, help="cgroup-v2 directory to attach to (default: the cgroup-v2 root)")
    p.set_defaults(func=cmd_load)
    u = sub.add_parser("uninstall", help="remove every attachment and pin")
    u.add_argument("--instance", help="only this instance (default: all)")
    u.add_argument("--drain-seconds", type=float, default=30.0,
                   help="wait this long for spliced connections to close (default 30)")
    u.add_argument("--force", action="store_true",
                   help="unpin even while spliced connections remain (their in-flight bytes may be lost)")
    u.set_defaults(func=cmd_uninstall)


def cmd_load(args: argparse.Namespace) -> int:
    r = loader.load(args.instance, args.cgroup)
    how = "programs swapped, maps kept" if r.reused_maps else "new maps"
    print(f"instance {r.instance} attached at {r.cgroup} ({how}; compiled in {r.compile_seconds:.1f}s)")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    names = [args.instance] if args.instance else loader.instances()
    pending = 0
    for n in names:
        left = loader.uninstall(n, force=args.force, drain_seconds=args.drain_seconds)
        if left:
            pending += 1
            print(f"instance {n}: detached (no new splicing), but {left} spliced connection(s) are still open;"
                  " their maps stay pinned so they keep working. Run again once they close, or use --force.")
        else:
            print(f"instance {n}: detached and unpinned")
    if not names:
        print("nothing to uninstall")
    return 1 if pending else 0
