"""Policy for the HBONE inbound of one local pod, for Envoy RBAC: the compiled verdicts expressed on
the peer's SPIFFE principal (the client certificate's URI SAN) and the CONNECT `:authority` port.

The tunnel knows a peer by its principal `spiffe://<td>/ns/<ns>/sa/<sa>`, not by its pod, so:
- Istio `principals` and `namespaces` (and their `not` forms, `source.principal`/`source.namespace`
  conditions) are exact: they are functions of the principal.
- A NetworkPolicy pod or namespace selector becomes the set of principals of the pods it selects now.
  This is an approximation where pods share a service account but not labels: a principal is allowed
  when any pod with it is (the same service account cannot be told apart on the wire).
- ipBlocks never match a tunnel peer (its address is not what the policy is about): a rule that needs
  an address to match does not match, and a `notIpBlocks` holds in DENY rules (they then deny more)
  but not in ALLOW rules (they allow less).
- A principal of no known pod (another cluster, a service account without pods) gets `default`:
  ALLOW rules match it only through "*" (their not-forms never); DENY rules match it unless every
  principal they name is the exact principal of a known pod (a namespace can always be its).
Only TCP is carried by the tunnel, so only TCP ports appear.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from accel.policy import ports as P
from accel.policy.compiler import Decision, PolicyCompiler, Segment, Signature
from accel.policy.peers import CidrBlock, Conj, IstioIpBlocks, Matcher, Namespaces, PeerKind, Principals
from accel.policy.rules import Layer, Rule
from accel.policy.types import RULE_NONE, Direction, Verdict

Decided = tuple[Verdict, int]  # (verdict, rule index); (ALLOW, RULE_NONE) where no policy decides
ALLOWED: Decided = (Verdict.ALLOW, RULE_NONE)


@dataclass(frozen=True, slots=True)
class RbacPortRange:
    """TCP ports lo..hi of the subject: `principals` lists the SPIFFE IDs whose verdict differs from
    `default`, which holds for every other principal."""

    lo: int
    hi: int
    default: Decided
    principals: Mapping[str, Decided]


@dataclass(frozen=True, slots=True)
class InboundRbac:
    subject: int
    ranges: tuple[RbacPortRange, ...]  # in port order, covering 0..65535; () when no policy applies

    def verdict(self, principal: str, port: int) -> Decided:
        for r in self.ranges:
            if r.lo <= port <= r.hi:
                return r.principals.get(principal, r.default)
        return ALLOWED


def inbound_rbac(compiler: PolicyCompiler, subject: int) -> InboundRbac:
    facts = compiler.facts(subject)
    dec = compiler.decision(facts, Direction.INGRESS) if facts is not None else None
    if facts is None or dec is None:
        return InboundRbac(subject, ())
    td = compiler.options.trust_domain
    known: dict[str, set[int]] = {}
    for f in compiler.peers.facts.values():
        if f.kind is PeerKind.POD:
            known.setdefault(f.principal(td), set()).add(f.number)
    ports = [_ingress_ports(r, facts.port_named) for r in dec.rules]

    def member(m: Matcher, ids: set[int] | None, deny: bool) -> bool | None:
        """Whether a principal (its pod identities; None: a principal of no known pod) is in `m`;
        None when the tunnel cannot know (an address)."""
        if isinstance(m, IstioIpBlocks | CidrBlock):
            return None
        if ids is not None:
            members = compiler.peers.members(m)
            return any(i in members for i in ids)
        if isinstance(m, Principals | Namespaces):
            if deny:  # could it be one of the patterns? Only the exact principals of known pods are ruled out
                return isinstance(m, Namespaces) or any(p not in known for p in m.patterns)
            return "*" in m.patterns
        return False

    def conj_holds(conj: Conj, ids: set[int] | None, deny: bool) -> bool:
        for m, neg in conj:
            v = member(m, ids, deny)
            if v is None:  # an address: never matches a tunnel peer
                if deny and neg:
                    continue
                return False
            if ids is None and neg:
                v = not deny  # a pattern may or may not name an unknown principal: the safe side
            if v == neg:
                return False
        return True

    def signature(ids: set[int] | None) -> Signature:
        out = []
        for ri, r in enumerate(dec.rules):
            deny = r.layer is Layer.ISTIO_DENY
            if ports[ri] and (r.peers is None or any(conj_holds(c, ids, deny) for c in r.peers)):
                out.append((ri, ports[ri]))
        return tuple(out)

    covers = {name: _tcp_cover(dec, signature(ids)) for name, ids in known.items()}
    default_cover = _tcp_cover(dec, signature(None))
    cuts = sorted({lo for cover in [default_cover, *covers.values()] for lo, _, _ in cover} | {P.PORT_MAX + 1})
    ranges: list[RbacPortRange] = []
    for lo, nxt in zip(cuts, cuts[1:], strict=False):
        default = _at(default_cover, lo)
        differing = {f"spiffe://{name}": v for name, cover in covers.items() if (v := _at(cover, lo)) != default}
        if ranges and ranges[-1].default == default and dict(ranges[-1].principals) == differing:
            last = ranges[-1]
            ranges[-1] = RbacPortRange(last.lo, nxt - 1, default, last.principals)
        else:
            ranges.append(RbacPortRange(lo, nxt - 1, default, MappingProxyType(differing)))
    return InboundRbac(subject, tuple(ranges))


def _ingress_ports(r: Rule, port_named: Callable[[str, int], frozenset[int]]) -> P.PortSet:
    """A rule's TCP ports; names are resolved on the subject (ingress)."""
    extra = P.portset((proto, n, n) for name, proto in r.named_ports for n in port_named(name, proto))
    return P.intersect(P.union(r.ports, extra), P.all_ports([P.TCP]))


def _tcp_cover(dec: Decision, sig: Signature) -> list[tuple[int, int, Decided]]:
    segs: tuple[Segment, ...] = dec.segments(sig)
    out: list[tuple[int, int, Decided]] = []
    at = 0
    for proto, lo, hi, v, rule in segs:
        if proto != P.TCP:
            continue
        if lo > at:
            out.append((at, lo - 1, ALLOWED))
        out.append((lo, hi, (Verdict(v), rule)))
        at = hi + 1
    if at <= P.PORT_MAX:
        out.append((at, P.PORT_MAX, ALLOWED))
    return out


def _at(cover: list[tuple[int, int, Decided]], port: int) -> Decided:
    for lo, hi, v in cover:
        if lo <= port <= hi:
            return v
    return ALLOWED
