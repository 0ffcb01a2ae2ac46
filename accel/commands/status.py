"""`accel status`: what is attached where, pinned maps with entry counts, counters."""

from __future__ import annotations

import argparse
import json

from sockops_bpf import loader
from sockops_bpf.inspect import describe


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="eBPF attachments, pinned maps and counters of each instance")
    p.add_argument("--instance", help="only this instance")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    names = [args.instance] if args.instance else loader.instances()
    docs = [describe(n) for n in names]
    if args.json:
        print(json.dumps(docs, indent=1))
        return 0
    if not docs:
        print(f"no meshaccel instance is loaded (nothing pinned under {loader.pin_root()})")
        return 0
    for d in docs:
        print(f"instance {d['instance']}  ({d['pin_dir']})")
        for a in d["attachments"]:
            where = a.get("cgroup") or a.get("map")
            print(f"  attached  {a['program']:<20} {a['hook']:<16} {where}")
        if not any(a["hook"] == "cgroup_sock_ops" for a in d["attachments"]):
            print("  attached  (sockops detached: no new connections are spliced)")
        for name, m in d["maps"].items():
            entries = m.get("entries")
            shown = f"{entries}/{m['max_entries']}" if entries is not None else f"-/{m['max_entries']}"
            print(f"  map       {name:<20} entries {shown}")
        for k, v in d.get("counters", {}).items():
            print(f"  counter   {k:<20} {v}")
    return 0
