"""`accel observe`: the flows the node agent saw, the way `hubble observe` shows them.

Recent flows (the last 20, `--last N`, `--all`) or, with `--follow`, live ones as they come; filters
`--pod --namespace --identity --service --verdict --port --since` (a filter given twice means either
value; different filters must all hold); a table for people or `--output json` (one JSON object per
line) for programs; `--map FILE.svg|FILE.png` draws the service map of the matching recent flows.

Filters that match nothing print nothing on stdout and exit 0, as `hubble observe` does, with a
note on stderr saying how many flows the agent keeps. While following, flows this reader fell
behind on are dropped by the agent (never slowing it): a note on stderr says how many, and with
`-o json` a line `{"lost_events": N, "time": T}` says it too.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import orjson

from accel.errors import UserError
from accel.flows import FILTER_OPTIONS, FilterError, Flow, FlowFilter, flow_from_dict

DEFAULT_AGENT = "http://127.0.0.1:9464"  # accel agent --listen default
CONNECT_TIMEOUT = 5.0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("observe", help="show the flows the node agent saw (recent or --follow), or draw a map",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent", default=DEFAULT_AGENT, metavar="URL", help=f"the agent's HTTP endpoint ({DEFAULT_AGENT})")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new flows until interrupted")
    p.add_argument("--last", type=int, metavar="N",
                   help="the newest N matching flows first (default 20; 0 with --follow)")
    p.add_argument("--all", action="store_true", help="every matching flow the agent keeps")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table",
                   help="table for people, json (one flow per line) for programs")
    p.add_argument("--map", type=Path, metavar="FILE.svg|FILE.png",
                   help="draw the service map of the matching recent flows (all of them unless --last)")
    g = p.add_argument_group("filters (repeat one for alternatives)")
    g.add_argument("--pod", action="append", default=[], metavar="[NS/]NAME",
                   help="either end is this pod (or a pod whose name starts so)")
    g.add_argument("--namespace", action="append", default=[], metavar="NS", help="either end is in this namespace")
    g.add_argument("--identity", action="append", default=[], metavar="SPIFFE_ID", help="either end has this identity")
    g.add_argument("--service", action="append", default=[], metavar="[NS/]NAME", help="to this Service")
    g.add_argument("--verdict", action="append", default=[], metavar="forwarded|denied|refused")
    g.add_argument("--port", action="append", default=[], metavar="PORT", help="either end's port, or the service port")
    g.add_argument("--since", metavar="DURATION|TIME", help="flows since then: 30s, 5m, 1h, or 2025-01-02T15:04:05Z")
    p.set_defaults(func=cmd_observe)


def filter_of(args: argparse.Namespace) -> FlowFilter:
    values = {k: list(getattr(args, k) or []) for k in FILTER_OPTIONS if k != "since"}
    if args.since is not None:
        values["since"] = [args.since]
    try:
        return FlowFilter.parse(values)
    except FilterError as e:
        raise UserError(str(e)) from None


def cmd_observe(args: argparse.Namespace) -> int:
    flt = filter_of(args)
    if args.last is not None and args.last < 0:
        raise UserError(f"--last {args.last} is negative; give the number of flows to show")
    if args.map is not None and args.follow:
        raise UserError("--map draws the recent flows; it cannot --follow (drop one of them)")
    if args.map is not None and args.map.suffix.lower() not in (".svg", ".png"):
        raise UserError(f"--map {args.map}: name the file .svg or .png (the format follows the suffix)")
    query = flt.query()
    if args.follow:
        query.append(("follow", "1"))
    if args.all or (args.map is not None and args.last is None):
        query.append(("all", "1"))
    elif args.last is not None:
        query.append(("last", str(args.last)))
    client = AgentStream(args.agent, query, follow=args.follow)
    out = sys.stdout
    try:
        with client:
            if args.map is not None:
                return draw_map(client, args.map, flt)
            return print_flows(client, out, args.output, args.follow, flt)
    except KeyboardInterrupt:  # the way to end --follow
        return 0
    except BrokenPipeError:  # `accel observe | head`: quiet, and keep Python's flush at exit quiet too
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# --- talking to the agent ----------------------------------------------------------------------------

class AgentStream:
    """GET /flows on the agent; yields JSON lines. Errors become one-line UserErrors."""

    def __init__(self, url: str, query: list[tuple[str, str]], follow: bool) -> None:
        u = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if u.scheme != "http" or not u.hostname:
            raise UserError(f"--agent {url!r} is not an http://HOST:PORT URL (e.g. {DEFAULT_AGENT})")
        self.base = f"http://{u.netloc}"
        self.host, self.port = u.hostname, u.port or 80
        self.path = u.path.rstrip("/") + "/flows" + ("?" + urllib.parse.urlencode(query) if query else "")
        self.follow = follow
        self.kept: int | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None

    def __enter__(self) -> AgentStream:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT)
        self._conn = conn
        try:
            conn.request("GET", self.path)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise UserError(f"no agent answers at {self.base} ({e}); start one with `accel agent` "
                            "or pass --agent URL") from None
        if resp.status != 200:
            text = resp.read().decode(errors="replace").strip().splitlines()
            conn.close()
            what = text[0] if text else f"HTTP {resp.status}"
            if resp.status == 404:
                raise UserError(f"the agent at {self.base} serves no /flows (an older agent?): {what}")
            raise UserError(f"the agent at {self.base} refused: {what}")
        kept = resp.getheader("X-Flows-Kept")
        self.kept = int(kept) if kept and kept.isdigit() else None
        if self.follow and conn.sock is not None:
            conn.sock.settimeout(None)  # a quiet stream is not a dead agent
        self._resp = resp
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.close()

    def lines(self) -> Iterator[bytes]:
        assert self._resp is not None
        try:
            for line in self._resp:
                if line.strip():
                    yield line
        except (OSError, http.client.HTTPException) as e:
            raise UserError(f"the agent at {self.base} ended the stream ({e})") from None

    def docs(self) -> Iterator[tuple[bytes, dict[str, object]]]:
        for line in self.lines():
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise UserError(f"the agent at {self.base} sent a line that is no JSON: {line[:80]!r}") from None
            yield line, doc


# --- output ----------------------------------------------------------------------------------------

def print_flows(client: AgentStream, out: IO[str], output: str, follow: bool, flt: FlowFilter) -> int:
    table = Table(out)
    shown = 0
    for line, doc in client.docs():
        if "lost_events" in doc:
            if output == "json":
                out.write(line.decode().rstrip("\n") + "\n")
            print(f"accel observe: {doc['lost_events']} flow(s) dropped: this reader fell behind", file=sys.stderr)
            continue
        if output == "json":
            out.write(line.decode().rstrip("\n") + "\n")
        else:
            table.row(flow_from_dict(doc))
        shown += 1
        if follow:
            out.flush()
    out.flush()
    if shown == 0 and not follow:
        print(nothing_matched(client.kept, flt), file=sys.stderr)
    return 0


def nothing_matched(kept: int | None, flt: FlowFilter) -> str:
    if kept == 0:
        return "accel observe: the agent has recorded no flows yet"
    held = f"the agent keeps {kept} flow(s)" if kept is not None else "the agent keeps some flows"
    if flt.empty():
        return f"accel observe: no flows to show ({held})"
    return f"accel observe: no flows match these filters ({held}; try fewer filters or an earlier --since)"


COLUMNS = (("TIME", 19), ("SOURCE", 30), ("DESTINATION", 30), ("SERVICE", 18), ("PATH", 12), ("EVENT", 7),
           ("VERDICT", 9))


class Table:
    """Fixed-width columns (so --follow can print each row as it comes); long values push the rest."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.header = False

    def row(self, f: Flow) -> None:
        if not self.header:
            self._write([name for name, _ in COLUMNS] + ["SUMMARY"])
            self.header = True
        self._write(cells(f))

    def _write(self, values: list[str]) -> None:
        parts = [v.ljust(w) for v, (_, w) in zip(values, COLUMNS, strict=False)]
        self.out.write("  ".join(parts + values[len(COLUMNS):]).rstrip() + "\n")


def endpoint_text(ip: str, port: int, pod: str) -> str:
    host = pod or (f"[{ip}]" if ":" in ip else ip)
    return f"{host}:{port}" if port else host


def cells(f: Flow) -> list[str]:
    t = time.localtime(f.time)
    stamp = time.strftime("%b %d %H:%M:%S", t) + f".{int(f.time * 1000) % 1000:03d}"
    path = f.path + (" mTLS" if f.encrypted else "")
    return [stamp, endpoint_text(f.src.ip, f.src.port, f.src.pod), endpoint_text(f.dst.ip, f.dst.port, f.dst.pod),
            f.service or "-", path, f.event, f.verdict.upper(), summary(f)]


def summary(f: Flow) -> str:
    parts = []
    if f.http_method or f.http_status:
        parts.append(f"{f.http_method} {f.http_path} -> {f.http_status or '-'}".strip())
        if f.route:
            parts.append(f"route {f.route}")
    if f.verdict != "forwarded" or f.reason:
        parts.append(f"reason {f.reason or '-'}" + (f" ({f.policy})" if f.policy else ""))
    if f.event == "close":
        bound = "" if f.bytes_exact else ">="
        parts.append(f"sent {bound}{f.bytes_sent} B, received {bound}{f.bytes_received} B in {f.duration_seconds:.3f}s")
    if f.response_flags and f.response_flags != "-":
        parts.append(f"flags {f.response_flags}")
    if f.src.identity or f.dst.identity:
        parts.append(f"{_short_id(f.src.identity)} -> {_short_id(f.dst.identity)}")
    return "; ".join(parts)


def _short_id(spiffe: str) -> str:
    """spiffe://td/ns/NS/sa/SA -> NS/SA (the trust domain is the same everywhere in one mesh)."""
    if not spiffe:
        return "?"
    parts = spiffe.removeprefix("spiffe://").split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return f"{parts[2]}/{parts[4]}"
    return spiffe


def draw_map(client: AgentStream, path: Path, flt: FlowFilter) -> int:
    from accel import flows_map

    flows = [flow_from_dict(doc) for _, doc in client.docs() if "lost_events" not in doc]
    m = flows_map.render(flows, path, title=f"meshaccel service map: {len(flows)} flow(s)")
    if not flows:
        print(nothing_matched(client.kept, flt) + "; the map shows only the legend", file=sys.stderr)
    print(f"wrote {path}: {len(m.nodes)} node(s), {len(m.edges)} edge(s) from {m.flows} flow(s)")
    return 0
