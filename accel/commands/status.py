"""`accel status`: what is attached where, pinned maps with entry counts, counters."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any

from sockops_bpf import loader
from sockops_bpf.inspect import describe

DEFAULT_AGENT = "http://127.0.0.1:9464"  # accel agent --listen default


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="eBPF attachments, pinned maps and counters of each instance")
    p.add_argument("--instance", help="only this instance")
    p.add_argument("--json", action="store_true")
    p.add_argument("--agent", default=DEFAULT_AGENT, metavar="URL",
                   help=f"the node agent's HTTP endpoint: sync state, certificates, xDS (default {DEFAULT_AGENT}); "
                        "(not in --json output: read the agent's /status for that)")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    names = [args.instance] if args.instance else loader.instances()
    docs = [describe(n) for n in names]
    if args.json:
        print(json.dumps(docs, indent=1))
        return 0
    if not docs:
        print(f"no meshaccel instance is loaded (nothing pinned under {loader.pin_root()})")
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
            lay = d["layouts"].get(name, {})
            older = f", older layout {lay['older_pinned']} still pinned (draining)" if lay.get("older_pinned") else ""
            print(f"  map       {name:<20} entries {shown:<16} layout {lay.get('version', 1)}{older}")
        for k, v in d.get("counters", {}).items():
            print(f"  counter   {k:<20} {v}")
    print_agent(args.agent)
    return 0


def print_agent(url: str) -> None:
    """The running agent's view, or one line saying none answers."""
    base = url.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/status", timeout=2) as r:
            st: dict[str, Any] = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"no agent answers at {base} ({reason}); start one with `accel agent` or pass --agent URL")
        return
    sync = f"ready (synced in {st['ready_seconds']:.2f}s)" if st.get("ready") else "not ready (initial sync pending)"
    print(f"agent {st.get('node')}  {base}  source {st.get('source')}  {sync}, lag {st.get('lag_seconds', 0):.3f}s, "
          f"{st.get('events_applied', 0)} events, {st.get('local_endpoints', 0)} local endpoints")
    objects = "  ".join(f"{k} {v}" for k, v in (st.get("objects") or {}).items() if v)
    print(f"  objects   {objects or 'none'}")
    certs = st.get("certs")
    if certs is None:
        print("  certs     off (no --ca-dir / --ca-address)")
    else:
        print(f"  certs {certs['with_certificate']}/{certs['identities']} identities with a certificate, "
              f"{certs['failing']} failing")
        for c in certs["certificates"]:
            if c.get("failures"):
                print(f"    failing {c['spiffe_id']}: {c.get('last_error')}")
    xds = st.get("xds")
    if xds is None:
        print("  xds       off (no --xds-listen)")
        return
    print(f"  xds       {xds['address']}  version {xds['snapshot_version'] or '-'}, {len(xds['streams'])} stream(s), "
          f"{len(xds['listeners'])} listener(s), {xds['nacks_total']} NACK(s) in total, "
          f"{len(xds['rejected'])} rejected now")
    for name, addr in xds["listeners"].items():
        print(f"    listener {name:<40} {addr}")
    for r in xds["rejected"]:
        print(f"    REJECTED by {r['node']} {r['type']} version {r['version']}: {r['error']}")
