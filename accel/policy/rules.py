"""NetworkPolicy and AuthorizationPolicy records -> normalized rules: who a policy is for, and per
rule the peers (conjunctions of matcher literals) and ports it matches. Pure functions of one record;
every reading that drops or widens something is a Problem naming the object.

Readings (POLICY.md, DESIGN.md):
- NetworkPolicy: a rule allows; a pod selected by a policy with Ingress (Egress) in its policyTypes
  is isolated in that direction (its "default-deny" rule denies what no rule allows). A rule with an
  unreadable part is dropped (it allows nothing); a policy whose spec is unreadable isolates what it
  selects and allows nothing.
- AuthorizationPolicy (ingress, TCP only: Istio's data path carries TCP): DENY rules deny; an ALLOW
  policy that applies makes everything its rules do not match denied ("allow-policies-exist").
  An L7 field (methods, paths, hosts, request principals, remote IPs, request `when` keys) in a DENY
  rule is left out, so the rule denies at L4 whatever its L4 part matches; an ALLOW rule with one is
  dropped (it would allow more than it says). AUDIT and CUSTOM policies and policies attached by
  targetRef (waypoints, gateways) are not enforced here; each is reported.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from accel.policy import ports as P
from accel.policy.peers import (
    CidrBlock,
    Conj,
    IstioIpBlocks,
    Literal,
    Matcher,
    NamedPortHolders,
    Namespaces,
    PeerFacts,
    PeerKind,
    PodSelector,
    Principals,
    selector_key,
)
from accel.policy.types import Direction, Problem, RuleRef, Verdict
from accel.state.model import (
    AuthorizationPolicy,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    LabelSelector,
    NetworkPolicy,
    NetworkPolicyPeer,
    NetworkPolicyRule,
)
from accel.state.parse import WHEN_L4_KEYS


class Layer(enum.IntEnum):
    """Evaluated in this order: an Istio DENY match denies; then NetworkPolicy isolation; then Istio ALLOW."""

    ISTIO_DENY = 0
    NETWORK_POLICY = 1
    ISTIO_ALLOW = 2


@dataclass(frozen=True, slots=True)
class Rule:
    ref: RuleRef
    layer: Layer
    direction: Direction
    peers: tuple[Conj, ...] | None  # any conjunction matching suffices; None: every peer
    ports: P.PortSet
    # (name, proto): a NetworkPolicy named port, resolved on the subject (ingress) or on the peer (egress)
    named_ports: tuple[tuple[str, int], ...] = ()
    text: str = ""

    @property
    def verdict(self) -> Verdict:
        return Verdict.DENY if self.layer is Layer.ISTIO_DENY else Verdict.ALLOW


@dataclass(frozen=True, slots=True)
class Scope:
    """The pods a policy is for: pods of `namespace` ("": every namespace) matching `selector` (None: all)."""

    namespace: str
    selector: LabelSelector | None

    def selects(self, f: PeerFacts) -> bool:
        if f.kind is not PeerKind.POD or (self.namespace and f.namespace != self.namespace):
            return False
        return self.selector is None or self.selector.matches(f.labels)


@dataclass(frozen=True, slots=True)
class PolicyRules:
    """One policy object, normalized."""

    kind: str
    namespace: str
    name: str
    scope: Scope
    rules: tuple[Rule, ...]
    isolates: tuple[Direction, ...]  # directions where what no rule allows is denied by `default`
    default: RuleRef | None
    default_text: str
    matchers: frozenset[Matcher]  # every matcher the rules use (their members need entries)
    cidrs: frozenset[str]  # every CIDR the rules name (ipcache entries with CIDR identities)
    problems: tuple[Problem, ...]

    @property
    def sort_key(self) -> tuple[str, str, str]:
        return self.kind, self.namespace, self.name


def describe_selector(sel: LabelSelector | None) -> str:
    if sel is None:
        return "all"
    parts = [f"{k}={v}" for k, v in sorted(sel.match_labels.items())]
    parts += [f"{r.key} {r.operator}" + (f" ({','.join(r.values)})" if r.values else "") for r in sel.match_expressions]
    return ",".join(parts) or "all"


def _matchers_of(rules: list[Rule]) -> frozenset[Matcher]:
    out: set[Matcher] = set()
    for r in rules:
        for conj in r.peers or ():
            out |= {m for m, _ in conj}
        if r.direction is Direction.EGRESS:
            out |= {NamedPortHolders(name, proto) for name, proto in r.named_ports}
    return frozenset(out)


def _cidrs_of(matchers: frozenset[Matcher]) -> frozenset[str]:
    out: set[str] = set()
    for m in matchers:
        if isinstance(m, CidrBlock):
            out |= {m.cidr, *m.excepts}
        elif isinstance(m, IstioIpBlocks):
            out |= set(m.cidrs)
    return frozenset(out)


# --- NetworkPolicy --------------------------------------------------------------------------------


def _np_peer(np: NetworkPolicy, peer: NetworkPolicyPeer) -> tuple[Conj, str]:
    if peer.ip_block is not None:
        b = peer.ip_block
        text = b.cidr + (f" except {','.join(b.except_)}" if b.except_ else "")
        return ((CidrBlock(b.cidr, b.except_), False),), text
    pod = selector_key(peer.pod_selector) if peer.pod_selector is not None else None
    if peer.namespace_selector is None:  # podSelector alone: the policy's own namespace
        return ((PodSelector(np.namespace, None, pod), False),), \
            f"pods {describe_selector(peer.pod_selector)} in {np.namespace}"
    return ((PodSelector("", selector_key(peer.namespace_selector), pod), False),), \
        f"pods {describe_selector(peer.pod_selector)} in namespaces {describe_selector(peer.namespace_selector)}"


def _np_rule(np: NetworkPolicy, rule: NetworkPolicyRule, direction: Direction, i: int) -> Rule:
    field = "ingress" if direction is Direction.INGRESS else "egress"
    ref = RuleRef(str(np.kind), np.namespace, np.name, f"{field}[{i}]")
    peers: tuple[Conj, ...] | None = None
    peer_text = "every peer"
    if rule.peers:
        described = [_np_peer(np, p) for p in rule.peers]
        peers = tuple(c for c, _ in described)
        peer_text = "; ".join(t for _, t in described)
    ranges: list[P.PortRange] = []
    named: list[tuple[str, int]] = []
    for p in rule.ports:
        proto = P.PROTOCOLS[p.protocol]
        if p.port is None:
            ranges.append((proto, 0, P.PORT_MAX))
        elif isinstance(p.port, str):
            named.append((p.port, proto))
        else:
            ranges.append((proto, p.port, p.end_port or p.port))
    portset = P.portset(ranges) if rule.ports else P.all_ports()
    proto_names = {v: k for k, v in P.PROTOCOLS.items()}
    port_text = ", ".join([P.describe(portset)] * bool(portset)
                          + [f"{proto_names[proto]} port named {name}" for name, proto in named])
    word = "from" if direction is Direction.INGRESS else "to"
    return Rule(ref, Layer.NETWORK_POLICY, direction, peers, portset, tuple(named),
                f"allow {field} {word} {peer_text} on {port_text}")


def normalize_network_policy(np: NetworkPolicy) -> PolicyRules:
    problems = [Problem("network_policy_invalid", np.key, f"object={np.key} {text}; the policy allows nothing, "
                        "the pods it selects stay isolated") for text in np.problems]
    rules: list[Rule] = []
    isolates = tuple(d for d, t in ((Direction.INGRESS, "Ingress"), (Direction.EGRESS, "Egress"))
                     if t in np.policy_types)
    if not np.problems:
        for direction, items in ((Direction.INGRESS, np.ingress), (Direction.EGRESS, np.egress)):
            if direction not in isolates:
                continue  # rules of a direction the policy does not isolate are ignored, as the API says
            for i, r in enumerate(items):
                if r.problems:
                    problems += [Problem("network_policy_rule_dropped", np.key,
                                         f"object={np.key} {text}; this rule allows nothing") for text in r.problems]
                    continue
                rules.append(_np_rule(np, r, direction, i))
    matchers = _matchers_of(rules)
    return PolicyRules(str(np.kind), np.namespace, np.name, Scope(np.namespace, np.pod_selector), tuple(rules),
                       isolates, RuleRef(str(np.kind), np.namespace, np.name, "default-deny"),
                       f"deny what no rule of NetworkPolicy {np.namespace}/{np.name} allows to the pods it selects "
                       f"({describe_selector(np.pod_selector)})",
                       matchers, _cidrs_of(matchers), tuple(problems))


# --- AuthorizationPolicy --------------------------------------------------------------------------


def _conj_of_source(s: AuthzSource) -> Conj:
    lits: list[Literal] = []
    for values, negated, cls in ((s.principals, False, Principals), (s.not_principals, True, Principals),
                                 (s.namespaces, False, Namespaces), (s.not_namespaces, True, Namespaces)):
        if values:
            lits.append((cls(tuple(values)), negated))
    if s.ip_blocks:
        lits.append((IstioIpBlocks(tuple(s.ip_blocks)), False))
    if s.not_ip_blocks:
        lits.append((IstioIpBlocks(tuple(s.not_ip_blocks)), True))
    return tuple(lits)


def _ports_of_operation(op: AuthzOperation) -> P.PortSet:
    tcp = P.TCP
    s = P.portset((tcp, int(x), int(x)) for x in op.ports) if op.ports else P.all_ports([tcp])
    return P.minus(s, P.portset((tcp, int(x), int(x)) for x in op.not_ports))


def _istio_rule(ap: AuthorizationPolicy, rule: AuthzRule, i: int, deny: bool) -> tuple[Rule | None, list[Problem]]:
    problems: list[Problem] = []
    ref = RuleRef(str(ap.kind), ap.namespace, ap.name, f"rules[{i}]")
    if rule.problems:
        if not deny:
            return None, [Problem("authorization_policy_rule_dropped", ap.key,
                                  f"object={ap.key} {t}; this ALLOW rule is dropped (allows nothing)")
                          for t in rule.problems]
        problems += [Problem("authorization_policy_rule_widened", ap.key,
                             f"object={ap.key} {t}; this DENY rule is enforced without it") for t in rule.problems]
    l7_when = [c.key for c in rule.when if c.key not in WHEN_L4_KEYS]
    l7 = any(s.has_l7 for s in rule.sources) or any(o.has_l7 for o in rule.operations) or bool(l7_when)
    if l7 and not deny:
        return None, [*problems, Problem("authorization_policy_l7_in_allow", ap.key,
                                         f"object={ap.key} rules[{i}] has L7 fields (HTTP methods, paths, hosts, "
                                         "request principals, remote IPs or request conditions) that this L4 data "
                                         "path cannot check; the ALLOW rule is dropped")]
    if l7:
        problems.append(Problem("authorization_policy_l7_in_deny", ap.key,
                                f"object={ap.key} rules[{i}] has L7 fields that this L4 data path cannot check; "
                                "the DENY rule is enforced without them (it denies every request its L4 part matches)"))
    when_lits: list[Literal] = []
    ports = P.all_ports([P.TCP])
    for c in rule.when:
        if c.key == "destination.port":
            if c.values:
                ports = P.intersect(ports, P.portset((P.TCP, int(x), int(x)) for x in c.values))
            ports = P.minus(ports, P.portset((P.TCP, int(x), int(x)) for x in c.not_values))
            continue
        cls = {"source.principal": Principals, "source.namespace": Namespaces, "source.ip": IstioIpBlocks}.get(c.key)
        if cls is None:
            continue  # L7: reported above
        if c.values:
            when_lits.append((cls(tuple(c.values)), False))
        if c.not_values:
            when_lits.append((cls(tuple(c.not_values)), True))
    if rule.operations:
        ports = P.intersect(ports, P.union(*(_ports_of_operation(o) for o in rule.operations)))
    peers: tuple[Conj, ...] | None
    if rule.sources:
        peers = tuple(_conj_of_source(s) + tuple(when_lits) for s in rule.sources)
        if any(not c for c in peers):
            peers = None  # one source matches every peer
    else:
        peers = (tuple(when_lits),) if when_lits else None
    verb = "deny" if deny else "allow"
    text = f"{verb} from {_describe_peers(peers)} on {P.describe(ports)}"
    return Rule(ref, Layer.ISTIO_DENY if deny else Layer.ISTIO_ALLOW, Direction.INGRESS, peers, ports, (), text), \
        problems


def _describe_peers(peers: tuple[Conj, ...] | None) -> str:
    if peers is None:
        return "every peer"

    def lit(m: Matcher, neg: bool) -> str:
        if isinstance(m, Principals):
            what = f"principals {','.join(m.patterns)}"
        elif isinstance(m, Namespaces):
            what = f"namespaces {','.join(m.patterns)}"
        elif isinstance(m, IstioIpBlocks):
            what = f"ipBlocks {','.join(m.cidrs)}"
        else:
            what = str(m)
        return ("not " if neg else "") + what

    return " or ".join(" and ".join(lit(m, n) for m, n in conj) for conj in peers)


def normalize_authorization_policy(ap: AuthorizationPolicy, root_namespace: str) -> PolicyRules:
    key = ap.key
    problems: list[Problem] = []
    rules: list[Rule] = []
    isolates: tuple[Direction, ...] = ()
    scope = Scope("" if ap.namespace == root_namespace else ap.namespace, ap.selector)
    if ap.target_refs:
        problems.append(Problem("authorization_policy_not_enforced", key,
                                f"object={key} is attached by targetRef to {', '.join(ap.target_refs)} (a waypoint "
                                "or gateway); meshaccel does not enforce it"))
    elif ap.action in ("AUDIT", "CUSTOM"):
        problems.append(Problem("authorization_policy_not_enforced", key,
                                f"object={key} action {ap.action} is not enforced by meshaccel"))
    else:
        deny = ap.action == "DENY"
        if ap.problems:
            what = "the DENY policy keeps the rules it could read" if deny else \
                "the ALLOW policy allows nothing (the pods it selects accept no connection)"
            problems += [Problem("authorization_policy_invalid", key, f"object={key} {t}; {what}") for t in ap.problems]
        if not deny:
            isolates = (Direction.INGRESS,)
        if deny or not ap.problems:
            for i, r in enumerate(ap.rules):
                rule, found = _istio_rule(ap, r, i, deny)
                problems += found
                if rule is not None:
                    rules.append(rule)
    matchers = _matchers_of(rules)
    return PolicyRules(str(ap.kind), ap.namespace, ap.name, scope, tuple(rules), isolates,
                       RuleRef(str(ap.kind), ap.namespace, ap.name, "allow-policies-exist") if isolates else None,
                       f"deny TCP to the pods AuthorizationPolicy {ap.namespace}/{ap.name} selects "
                       f"({describe_selector(ap.selector)}{', every namespace' if not scope.namespace else ''}) "
                       "that no ALLOW rule matches",
                       matchers, _cidrs_of(matchers), tuple(problems))
