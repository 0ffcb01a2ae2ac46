"""The kernel's lookup over compiled entries (POLICY.md "Kernel algorithm"), for `accel policy check`,
revocation and tests: the same entries the maps hold give the same verdict here."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from accel.policy.compiler import PolicyCompiler, PolicyOptions
from accel.policy.types import RULE_NONE, Compiled, Direction, PolicyKey, PolicyValue, RuleInfo, Verdict
from accel.state.identity import ID_ANY, ID_WORLD
from accel.state.model import Change, ChangeSet, Record, Workload, WorkloadChange


def lookup(entries: Mapping[PolicyKey, PolicyValue], subject: int, peer: int, direction: int, proto: int,
           port: int) -> PolicyValue | None:
    """Longest-prefix match on the port for one (subject, peer, direction, proto)."""
    for bits in range(16, -1, -1):
        masked = port & ~((1 << (16 - bits)) - 1) & 0xFFFF
        v = entries.get(PolicyKey(subject, peer, direction, proto, masked, bits))
        if v is not None:
            return v
    return None


def evaluate(compiled: Compiled, subject: int, peer: int, direction: Direction | int, proto: int,
             port: int) -> tuple[Verdict, int]:
    """(verdict, rule index): the peer's own entries, else ANY's, else ALLOW with RULE_NONE."""
    d = int(direction)
    v = lookup(compiled.entries, subject, peer, d, proto, port) if peer != ID_ANY else None
    if v is None:
        v = lookup(compiled.entries, subject, ID_ANY, d, proto, port)
    if v is None:
        return Verdict.ALLOW, RULE_NONE
    return Verdict(v.verdict), v.rule


def check_connection(compiled: Compiled, client: int, server: int, proto: int, port: int,
                     *, client_local: bool = True, server_local: bool = True) -> tuple[Verdict, int, Direction]:
    """A connection client -> server:port as the kernel decides it: the client's EGRESS (when the
    client is a local pod), then the server's INGRESS (when the server is); the first DENY decides."""
    last: tuple[Verdict, int, Direction] = (Verdict.ALLOW, RULE_NONE, Direction.EGRESS)
    for local, subject, peer, direction in ((client_local, client, server, Direction.EGRESS),
                                            (server_local, server, client, Direction.INGRESS)):
        if not local:
            continue
        verdict, rule = evaluate(compiled, subject, peer, direction, proto, port)
        last = (verdict, rule, direction)
        if verdict is Verdict.DENY:
            return last
    return last


def explain(compiled: Compiled, rule: int) -> RuleInfo | None:
    return compiled.rules.get(rule)


def identity_of_address(compiled: Compiled, address: str, exact: Mapping[str, int]) -> int:
    """The ipcache's answer for an address: `exact` holds the agent's /32 (/128) entries (pod IPs ->
    pod identities, node addresses -> HOST / REMOTE_NODE), which win; then the longest CIDR entry;
    then WORLD."""
    ip = ipaddress.ip_address(address)
    hit = exact.get(ip.compressed)
    if hit is not None:
        return hit
    best: tuple[int, int] | None = None
    for cidr, ident in compiled.ipcache.items():
        net = ipaddress.ip_network(cidr)
        if ip.version == net.version and ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, ident)
    return best[1] if best is not None else ID_WORLD


def compile_all(records: Iterable[Record], workloads: Iterable[Workload],
                options: PolicyOptions | None = None) -> PolicyCompiler:
    """A compiler fed with everything at once (the CLI, tests, a full recompile to compare with)."""
    compiler = PolicyCompiler(options)
    changes = tuple(Change(r.key, None, r) for r in records)
    compiler.on_change(ChangeSet(changes, tuple(WorkloadChange(w.key, None, w) for w in workloads), synced=True))
    return compiler
