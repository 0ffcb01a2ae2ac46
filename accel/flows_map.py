"""The service map of a set of flows, drawn by Graphviz (`dot`): workloads as nodes, one edge per
(source, destination, kind) with its connections, requests and bytes; kinds drawn apart and
explained in a legend: encrypted (mTLS, solid green), plaintext (dashed grey), denied or refused
(dotted red, blunt arrow).

Nodes are workloads ("namespace/workload"); an address the agent could not resolve stands for itself
(its IP). A connection is counted once however many events it produced (open, close); an L7 request
counts as a request (the kernel's flow of the connection into Envoy is left out: Envoy's request flows draw
that edge, to the backend reached). Every node and edge carries an SVG id (`node:<key>`, `edge:<src>-><dst>:<kind>`)
so programs and tests can read the picture back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import graphviz

from accel.errors import UserError
from accel.flows import Endpoint, Flow, into_l7_proxy

FORMATS = ("svg", "png")
STYLES = {
    "encrypted": {"color": "#2e7d32", "fontcolor": "#2e7d32", "style": "solid", "penwidth": "2.2"},
    "plaintext": {"color": "#78909c", "fontcolor": "#455a64", "style": "dashed", "penwidth": "1.4"},
    "denied": {"color": "#c62828", "fontcolor": "#c62828", "style": "dotted", "penwidth": "2.0",
               "arrowhead": "tee"},
}
LEGEND = {"encrypted": "encrypted (mTLS)", "plaintext": "plaintext", "denied": "denied / refused"}


def node_key(ep: Endpoint) -> str:
    return f"{ep.namespace}/{ep.workload}" if ep.workload else ep.ip


def edge_kind(f: Flow) -> str:
    if f.verdict != "forwarded":
        return "denied"
    return "encrypted" if f.encrypted else "plaintext"


@dataclass
class MapEdge:
    src: str
    dst: str
    kind: str
    connections: int = 0
    requests: int = 0
    bytes: int = 0
    denied: int = 0
    refused: int = 0
    paths: set[str] = field(default_factory=set)
    _seen: set[tuple[object, ...]] = field(default_factory=set, repr=False)

    def label(self) -> str:
        parts = []
        if self.connections and self.kind != "denied":  # there the denied/refused counts say it
            parts.append(f"{self.connections} conn" + ("s" if self.connections != 1 else ""))
        if self.requests:
            parts.append(f"{self.requests} req")
        if self.denied:
            parts.append(f"{self.denied} denied")
        if self.refused:
            parts.append(f"{self.refused} refused")
        if self.bytes:
            parts.append(human_bytes(self.bytes))
        return ", ".join(parts) + (f"\n{'/'.join(sorted(self.paths))}" if self.paths else "")


@dataclass
class ServiceMap:
    nodes: dict[str, str]  # key -> label
    edges: dict[tuple[str, str, str], MapEdge]
    flows: int = 0


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def build(flows: Iterable[Flow]) -> ServiceMap:
    m = ServiceMap({}, {})
    for f in flows:
        if into_l7_proxy(f):
            continue  # Envoy's flows of its requests draw that edge, to the backend reached
        m.flows += 1
        a, b = node_key(f.src), node_key(f.dst)
        for key, ep in ((a, f.src), (b, f.dst)):
            if key not in m.nodes:
                m.nodes[key] = f"{ep.workload}\n{ep.namespace}" if ep.workload else ep.ip
        kind = edge_kind(f)
        e = m.edges.setdefault((a, b, kind), MapEdge(a, b, kind))
        e.paths.add(f.path)
        if f.path == "l7":
            if f.event == "close":
                e.requests += 1
        else:
            conn = (f.source, f.cookie, f.src.ip, f.src.port, f.dst.ip, f.dst.port)
            if conn not in e._seen:
                e._seen.add(conn)
                e.connections += 1
        if f.verdict == "denied":
            e.denied += 1
        elif f.verdict == "refused":
            e.refused += 1
        if f.event == "close":
            e.bytes += f.bytes_sent + f.bytes_received
    return m


def graph(m: ServiceMap, title: str = "") -> graphviz.Digraph:
    g = graphviz.Digraph("meshaccel", graph_attr={
        "rankdir": "LR", "fontname": "Helvetica", "label": title, "labelloc": "t", "nodesep": "0.5",
        "ranksep": "1.2", "bgcolor": "white"},
        node_attr={"shape": "box", "style": "rounded,filled", "fillcolor": "#eef3f8", "fontname": "Helvetica",
                   "color": "#90a4ae"},
        edge_attr={"fontname": "Helvetica", "fontsize": "10"})
    ids = {key: f"n{i}" for i, key in enumerate(sorted(m.nodes))}
    for key in sorted(m.nodes):
        unresolved = "/" not in key
        g.node(ids[key], m.nodes[key], id=f"node:{key}", tooltip=key,
               **({"fillcolor": "#fff8e1", "style": "rounded,filled,dashed"} if unresolved else {}))
    for (a, b, kind), e in sorted(m.edges.items()):
        g.edge(ids[a], ids[b], label=e.label(), id=f"edge:{a}->{b}:{kind}", tooltip=f"{a} -> {b} ({kind})",
               **STYLES[kind])
    with g.subgraph(name="cluster_legend", graph_attr={"label": "legend", "style": "rounded", "color": "#b0bec5",
                                                       "fontname": "Helvetica"}) as lg:
        for kind, text in LEGEND.items():
            lg.node(f"legend_{kind}_a", "", shape="point", width="0.05", id=f"legend:{kind}:a")
            lg.node(f"legend_{kind}_b", "", shape="point", width="0.05", id=f"legend:{kind}:b")
            lg.edge(f"legend_{kind}_a", f"legend_{kind}_b", label=text, id=f"legend:{kind}", **STYLES[kind])
    return g


def render(flows: Iterable[Flow], path: Path, title: str = "") -> ServiceMap:
    """Write the map of `flows` to `path` (.svg or .png). Raises UserError for another suffix or
    when Graphviz's `dot` is missing."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise UserError(f"--map {path}: name the file .svg or .png (the format follows the suffix)")
    m = build(flows)
    try:
        data = graph(m, title).pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise UserError("Graphviz's `dot` is not installed; install it (Debian: apt-get install graphviz) "
                        "or run scripts/setup.sh") from None
    try:
        path.write_bytes(data)
    except OSError as e:
        raise UserError(f"--map {path}: cannot write it ({e.strerror})") from None
    return m
