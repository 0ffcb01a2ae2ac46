"""Peers as the kernel sees them: identity numbers with the facts policies select on, the base
matchers that selectors, principals and CIDRs become, and an index that keeps each matcher's
members up to date as identities come, change and go (O(matchers) per changed identity).

Invariant the compiler relies on: ANY (0) is a member of no matcher, and an identity that is a
member of no matcher used by a subject's rules is judged exactly as ANY is, so it needs no entries.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from accel.policy.ports import PROTOCOLS
from accel.state.identity import CIDR_MAX, CIDR_MIN, ID_HOST, ID_REMOTE_NODE, ID_WORLD
from accel.state.model import EMPTY_MAP, ContainerPort, LabelSelector, LabelSelectorRequirement, frozen_map

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PeerKind(enum.Enum):
    POD = "pod"
    CIDR = "cidr"
    WORLD = "world"
    HOST = "host"
    REMOTE_NODE = "remote-node"


@dataclass(frozen=True, slots=True)
class PeerFacts:
    """What policies can know about one identity. For a pod identity: the union over its pods."""

    number: int
    kind: PeerKind
    namespace: str = ""
    service_account: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    ns_labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    named_ports: frozenset[ContainerPort] = frozenset()
    ips: frozenset[str] = frozenset()
    cidr: str = ""  # CIDR identities

    def principal(self, trust_domain: str) -> str:
        """Istio's principal form (a SPIFFE ID without `spiffe://`); "" for non-pods."""
        return f"{trust_domain}/ns/{self.namespace}/sa/{self.service_account}" if self.kind is PeerKind.POD else ""

    def port_named(self, name: str, proto: int) -> frozenset[int]:
        return frozenset(p.port for p in self.named_ports if p.name == name and PROTOCOLS.get(p.protocol) == proto)


RESERVED_FACTS = {
    ID_WORLD: PeerFacts(ID_WORLD, PeerKind.WORLD),
    ID_HOST: PeerFacts(ID_HOST, PeerKind.HOST),
    ID_REMOTE_NODE: PeerFacts(ID_REMOTE_NODE, PeerKind.REMOTE_NODE),
}


# --- base matchers: hashable descriptions of a set of identities ----------------------------------

SelectorKey = tuple[tuple[tuple[str, str], ...], tuple[LabelSelectorRequirement, ...]]


def selector_key(sel: LabelSelector) -> SelectorKey:
    return tuple(sorted(sel.match_labels.items())), sel.match_expressions


def _selector(key: SelectorKey) -> LabelSelector:
    return LabelSelector(frozen_map(dict(key[0])), key[1])


@dataclass(frozen=True, slots=True)
class PodSelector:
    """Pods in `namespace` (or in every namespace matching `namespace_selector`; None: all namespaces
    when `namespace` is "" too) whose labels match `pod_selector` (None: every pod)."""

    namespace: str
    namespace_selector: SelectorKey | None
    pod_selector: SelectorKey | None
    _ns: LabelSelector | None = field(default=None, compare=False, hash=False, repr=False)
    _pod: LabelSelector | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.namespace_selector is not None:
            object.__setattr__(self, "_ns", _selector(self.namespace_selector))
        if self.pod_selector is not None:
            object.__setattr__(self, "_pod", _selector(self.pod_selector))

    def matches(self, f: PeerFacts, trust_domain: str) -> bool:
        if f.kind is not PeerKind.POD:
            return False
        if self.namespace and f.namespace != self.namespace:
            return False
        if self._ns is not None and not self._ns.matches(f.ns_labels):
            return False
        return self._pod is None or self._pod.matches(f.labels)

    def namespaces(self) -> tuple[str, ...] | None:
        return (self.namespace,) if self.namespace else None


@dataclass(frozen=True, slots=True)
class NamedPortHolders:
    """Pods with a container port of this name and protocol (egress rules with a named port)."""

    name: str
    proto: int

    def matches(self, f: PeerFacts, trust_domain: str) -> bool:
        return f.kind is PeerKind.POD and bool(f.port_named(self.name, self.proto))

    def namespaces(self) -> tuple[str, ...] | None:
        return None


def _net(cidr: str) -> Network:
    return ipaddress.ip_network(cidr)


def _inside(inner: Network, outer: Network) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def _is_all(net: Network) -> bool:
    return net.prefixlen == 0


@dataclass(frozen=True, slots=True)
class CidrBlock:
    """A NetworkPolicy ipBlock, Cilium's reading: it matches addresses that are no pod's (pod IPs
    resolve to pod identities in the ipcache), i.e. the CIDR identity of every ipcache CIDR P inside
    `cidr` and inside none of `excepts`, plus WORLD (no ipcache match) when `cidr` is /0."""

    cidr: str
    excepts: tuple[str, ...] = ()
    _nets: tuple[Network, ...] = field(default=(), compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_nets", tuple(_net(c) for c in (self.cidr, *self.excepts)))

    def matches(self, f: PeerFacts, trust_domain: str) -> bool:
        outer, *excepts = self._nets
        if f.kind is PeerKind.WORLD:
            return _is_all(outer)
        if f.kind is not PeerKind.CIDR:
            return False
        p = _net(f.cidr)
        return _inside(p, outer) and not any(_inside(p, e) for e in excepts)

    def namespaces(self) -> tuple[str, ...] | None:
        return None


@dataclass(frozen=True, slots=True)
class IstioIpBlocks:
    """Istio `ipBlocks` (and `source.ip`): CIDR identities inside any block, WORLD when a block is /0,
    and pod identities whose every pod IP is inside some block (the identity is the unit the kernel
    sees; a pod identity half inside is not inside)."""

    cidrs: tuple[str, ...]
    _nets: tuple[Network, ...] = field(default=(), compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_nets", tuple(_net(c) for c in self.cidrs))

    def matches(self, f: PeerFacts, trust_domain: str) -> bool:
        nets = self._nets
        if f.kind is PeerKind.WORLD:
            return any(_is_all(n) for n in nets)
        if f.kind is PeerKind.CIDR:
            p = _net(f.cidr)
            return any(_inside(p, n) for n in nets)
        if f.kind is PeerKind.POD and f.ips:
            return all(any(_inside(ipaddress.ip_network(ip), n) for n in nets) for ip in f.ips)
        return False

    def namespaces(self) -> tuple[str, ...] | None:
        return None


def istio_match(pattern: str, value: str) -> bool:
    """Istio's string match: exact, "*" (any non-empty value), "prefix*" or "*suffix"."""
    if pattern == "*":
        return bool(value)
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def principal_namespace(pattern: str) -> str | None:
    """The namespace every principal matching `pattern` is in, when the pattern pins it ("td/ns/a/sa/b",
    "*/ns/a/sa/b", "td/ns/a/*"); None otherwise. Sound because no part of `<td>/ns/<ns>/sa/<sa>` holds a '/'."""
    if pattern.endswith("*"):
        core = pattern[:-1]
    elif pattern.startswith("*"):
        core = pattern[1:]
    else:
        core = pattern
    at = core.find("/ns/")
    if at < 0 or "*" in core:
        return None
    ns, slash, _ = core[at + 4:].partition("/")
    return ns if slash and ns else None  # a prefix that ends inside the namespace pins nothing


@dataclass(frozen=True, slots=True)
class Principals:
    """Istio `principals`: pod identities whose `<td>/ns/<ns>/sa/<sa>` matches a pattern."""

    patterns: tuple[str, ...]

    def matches(self, f: PeerFacts, trust_domain: str) -> bool:
        p = f.principal(trust_domain)
        return bool(p) and any(istio_match(x, p) for x in self.patterns)

    def namespaces(self) -> tuple[str, ...] | None:
        found = [principal_namespace(x) for x in self.patterns]
        return None if None in found else tuple(sorted({n for n in found if n is not None}))


@dataclass(frozen=True, slots=True)
class Namespaces:
    """Istio `namespaces`: pod identities whose namespace matches a pattern."""

    patterns: tuple[str, ...]

    def matches(self, f: PeerFacts, trust_domain: str) -> bool:
        return f.kind is PeerKind.POD and any(istio_match(x, f.namespace) for x in self.patterns)

    def namespaces(self) -> tuple[str, ...] | None:
        return None if any("*" in p for p in self.patterns) else tuple(sorted(set(self.patterns)))


Matcher = PodSelector | NamedPortHolders | CidrBlock | IstioIpBlocks | Principals | Namespaces
Literal = tuple[Matcher, bool]  # (matcher, negated)
Conj = tuple[Literal, ...]  # all literals hold; () matches every peer


# --- the index ----------------------------------------------------------------------------------


class PeerIndex:
    """Identity facts and the members of every matcher in use (refcounted by the policies using it)."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self.facts: dict[int, PeerFacts] = dict(RESERVED_FACTS)
        self._by_ns: dict[str, set[int]] = {}
        self._non_pods: set[int] = set(RESERVED_FACTS)
        self._members: dict[Matcher, set[int]] = {}
        self._refs: dict[Matcher, int] = {}

    def members(self, m: Matcher) -> set[int]:
        return self._members[m]

    def identities_in(self, namespace: str) -> set[int]:
        """The pod identities of one namespace."""
        return set(self._by_ns.get(namespace, ()))

    def matchers(self) -> Iterator[Matcher]:
        return iter(self._members)

    def hold(self, m: Matcher) -> None:
        n = self._refs.get(m, 0)
        self._refs[m] = n + 1
        if n == 0:
            self._members[m] = {i for i in self._candidates(m) if m.matches(self.facts[i], self.trust_domain)}

    def release(self, m: Matcher) -> None:
        n = self._refs[m] - 1
        if n:
            self._refs[m] = n
        else:
            del self._refs[m]
            del self._members[m]

    def _candidates(self, m: Matcher) -> Iterable[int]:
        if isinstance(m, CidrBlock):
            return self._non_pods
        namespaces = m.namespaces()  # a principal or namespace pinned: look only there, not at every identity
        if namespaces is not None:
            return [i for ns in namespaces for i in self._by_ns.get(ns, ())]
        return self.facts

    def set_facts(self, number: int, facts: PeerFacts | None) -> list[Matcher]:
        """Store (None: forget) one identity's facts; returns the matchers whose membership changed."""
        old = self.facts.get(number)
        if old is not None:
            group = self._by_ns.get(old.namespace) if old.kind is PeerKind.POD else self._non_pods
            if group is not None:
                group.discard(number)
                if not group and old.kind is PeerKind.POD:
                    del self._by_ns[old.namespace]
            del self.facts[number]
        if facts is not None:
            self.facts[number] = facts
            if facts.kind is PeerKind.POD:
                self._by_ns.setdefault(facts.namespace, set()).add(number)
            else:
                self._non_pods.add(number)
        changed = []
        for m, members in self._members.items():
            now = facts is not None and m.matches(facts, self.trust_domain)
            if now != (number in members):
                (members.add if now else members.discard)(number)
                changed.append(m)
        return changed


class CidrIdentities:
    """CIDR text -> a number in [CIDR_MIN, CIDR_MAX]: a hash of the text, probing on collision, kept
    while some policy names the CIDR. Holds are counted as policies change; `reconcile()` then hands
    out numbers for CIDRs that appeared and takes them from CIDRs that went, once per change, so a
    CIDR dropped and named again within one change keeps its number. A number taken is not handed out
    again before `settle()` (once the diff is out): one diff never gives one number two meanings."""

    def __init__(self, low: int = CIDR_MIN, high: int = CIDR_MAX) -> None:
        self.low, self.high = low, high
        self.by_cidr: dict[str, int] = {}
        self._cidr_of: dict[int, str] = {}
        self._refs: dict[str, int] = {}
        self._quarantine: set[int] = set()

    def natural(self, cidr: str) -> int:
        h = int.from_bytes(hashlib.blake2b(cidr.encode(), digest_size=8).digest(), "big")
        return self.low + h % (self.high - self.low + 1)

    def hold(self, cidr: str) -> None:
        self._refs[cidr] = self._refs.get(cidr, 0) + 1

    def release(self, cidr: str) -> None:
        left = self._refs[cidr] - 1
        if left:
            self._refs[cidr] = left
        else:
            del self._refs[cidr]

    def reconcile(self) -> tuple[dict[str, int], dict[str, int]]:
        """(CIDRs that got a number, CIDRs whose number was taken back), each CIDR -> number."""
        gone = {c: self.by_cidr[c] for c in sorted(self.by_cidr.keys() - self._refs.keys())}
        for c, n in gone.items():
            del self.by_cidr[c]
            del self._cidr_of[n]
            self._quarantine.add(n)
        added = {}
        size = self.high - self.low + 1
        for c in sorted(self._refs.keys() - self.by_cidr.keys()):
            n = self.natural(c)
            for _ in range(size):
                if n not in self._cidr_of and n not in self._quarantine:
                    break
                n = self.low + (n - self.low + 1) % size
            else:
                raise OverflowError(f"CIDR identity range [{self.low}, {self.high}] is full")
            self.by_cidr[c] = n
            self._cidr_of[n] = c
            added[c] = n
        return added, gone

    def settle(self) -> None:
        self._quarantine.clear()
