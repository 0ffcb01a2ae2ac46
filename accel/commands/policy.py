"""`accel policy check SRC DST PORT`: what the kernel decides for a connection, and which rule decided,
asked of the running agent (it reads the same pinned maps the kernel does)."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.parse
import urllib.request

from accel.commands.status import DEFAULT_AGENT
from accel.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("policy", help="identity policy: explain a verdict").add_subparsers(
        dest="policy_command", required=True)
    c = p.add_parser("check", help="would SRC reach DST:PORT? the verdict and the rule that decided")
    c.add_argument("src", help="an IP address or a pod as NAMESPACE/NAME")
    c.add_argument("dst", help="an IP address or a pod as NAMESPACE/NAME")
    c.add_argument("port", type=int)
    c.add_argument("--proto", choices=("tcp", "udp", "sctp"), default="tcp")
    c.add_argument("--agent", default=DEFAULT_AGENT, metavar="URL", help=f"the node agent (default {DEFAULT_AGENT})")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"src": args.src, "dst": args.dst, "port": args.port, "proto": args.proto})
    url = f"{args.agent.rstrip('/')}/policy/check?{query}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise UserError(json.loads(e.read() or b"{}").get("error", f"the agent answered {e.code}")) from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"no agent answers at {args.agent} ({getattr(e, 'reason', e)}); pass --agent URL") from None
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"{doc['verdict']}  {args.src} -> {args.dst}:{args.port}/{args.proto}  decided by {doc['decided_by']}: "
              f"{doc['rule_text']}" + (f" (rule {doc['rule']})" if doc["rule"] else ""))
    return 0 if doc["verdict"] == "ALLOW" else 1
