"""The policy compiler: the state model's policies and pods -> the entries of the kernel's LPM policy
map, the CIDR entries of the ipcache and the rule table (POLICY.md). It follows the model as a
subscriber does: `on_change(ChangeSet)` recompiles only the subjects the change can touch and returns
the map writes, in an order that never opens a hole.

How one subject S and direction is compiled:
1. Its rules: those of every policy whose scope selects S, ordered Istio DENY, NetworkPolicy, Istio
   ALLOW (then by policy and rule position, so the deciding rule does not depend on numbering).
2. Its explicit peers: the members of every matcher those rules use (plus HOST). Every other
   identity is judged as ANY is (peers.py), so it needs no entry.
3. Per peer, which rules match and on which ports; the verdict over each protocol's port space
   follows from that (deny wins: an Istio DENY match, then NetworkPolicy isolation, then Istio ALLOW).
   Results are cached by that signature, so 5,000 peers with a few distinct signatures cost a few
   verdict computations and one dict write per entry.
4. ANY gets entries where its verdict is decided by a rule; each explicit peer gets entries only
   where its verdict or deciding rule differs from ANY's, as disjoint port prefixes.
What a change recompiles: a policy change, the subjects its old and new scope select; a subject's own
change (it appears or goes on this node, its named ports change), that subject; an identity that
comes, goes or changes as a peer (pods, namespace labels, CIDRs), only that peer's entries of the
subjects that had it as an explicit peer or whose matchers' members changed (peers.py keeps them).

Write order of a diff: every single write keeps every (subject, address or identity, port) at its old
or its new verdict, never a third one (tests/test_policy_properties.py checks it after each write):
  1. a new CIDR's identity gets a copy of the entries of what its addresses resolved to before (the
     longest old CIDR around it, or WORLD): under the old rules it is judged as that one was
  2. ipcache upserts of new CIDRs      (their addresses keep their verdicts: step 1)
  3. upserts of named peers' entries   (a new entry wins over ANY, or a longer old entry still decides)
  4. upserts of ANY entries            (points that fall back to ANY have no old or new peer entry)
  5. removals of ANY entries
  6. removals of named peers' entries  (only now may a peer fall back to ANY, which is new)
     A CIDR that goes keeps its identity to here, with the new entries of what its addresses will
     resolve to (the ghost), so that
  7. ipcache removals of CIDRs that went change no verdict, and
  8. the ghosts' entries go.
Pod and node ipcache entries are the agent's: it should write a new pod identity's entries after the
diff of the same change (its entries exist when its address first resolves to it) and remove them
before it (a peer whose entries go never resolves without them).
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from accel.policy import ports as P
from accel.policy.peers import (
    CidrIdentities,
    Conj,
    Matcher,
    NamedPortHolders,
    PeerFacts,
    PeerIndex,
    PeerKind,
)
from accel.policy.rules import (
    Layer,
    PolicyRules,
    Rule,
    normalize_authorization_policy,
    normalize_network_policy,
)
from accel.policy.types import (
    FIRST_POLICY_RULE,
    IPCACHE_MAP,
    POLICY_MAP,
    RULE_DEFAULT_ALLOW,
    RULE_HOST,
    RULE_NONE,
    Compiled,
    Direction,
    MapOp,
    PolicyDiff,
    PolicyKey,
    PolicyValue,
    Problem,
    RuleInfo,
    RuleRef,
    Verdict,
)
from accel.state.identity import DEFAULT_TRUST_DOMAIN, ID_ANY, ID_HOST, ID_WORLD
from accel.state.model import (
    EMPTY_MAP,
    AuthorizationPolicy,
    ChangeSet,
    Kind,
    Namespace,
    NetworkPolicy,
    ObjectKey,
    Workload,
)
from accel.state.store import DEFAULT_ROOT_NAMESPACE, ObjectProblemReporter

log = logging.getLogger(__name__)

Value = tuple[int, int]  # (verdict, rule)
Segment = tuple[int, int, int, int, int]  # (proto, lo, hi, verdict, rule), decided ports only
Signature = tuple[tuple[int, P.PortSet], ...]  # (position in the rule list, ports it matches) per matching rule


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = DEFAULT_ROOT_NAMESPACE  # Istio's: AuthorizationPolicies there apply mesh-wide
    node: str | None = None  # subjects: identities with a pod on this node (None: every pod's)
    # Kubernetes: traffic between a pod and its own node (kubelet probes) is always allowed.
    host_always_allowed: bool = True


def _longest(ipcache: Mapping[str, int], cidr: str) -> int:
    """The identity addresses of `cidr` get from an ipcache without it: the longest CIDR around it
    (same family), else WORLD."""
    net = ipaddress.ip_network(cidr)
    best: tuple[int, int] | None = None
    for other, n in ipcache.items():
        o = ipaddress.ip_network(other)
        if other != cidr and o.version == net.version and net.subnet_of(o) and (best is None or o.prefixlen > best[0]):  # type: ignore[arg-type]
            best = (o.prefixlen, n)
    return best[1] if best is not None else ID_WORLD


def _matchers(dec: Decision, direction: Direction) -> set[Matcher]:
    """The matchers whose members need a look of their own for one subject and direction."""
    out = {m for r in dec.rules for conj in r.peers or () for m, _ in conj}
    if direction is Direction.EGRESS:  # named ports resolve on the peer
        out |= {NamedPortHolders(n, p) for r in dec.rules for n, p in r.named_ports}
    return out


def policy_pod(w: Workload) -> bool:
    """Pods policy is about, as subjects and as peers: they have addresses of their own (not the
    node's) and are not finished. The ipcache's pod entries should cover exactly these."""
    p = w.pod
    return not p.host_network and p.phase not in ("Succeeded", "Failed")


# --- the verdict function -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """What decides for one subject and direction: its rules in evaluation order, their rule-table
    indices, and the rules that deny what isolation leaves out (None: not isolated by that layer)."""

    rules: tuple[Rule, ...]
    indices: tuple[int, ...]
    np_default: int | None
    istio_default: int | None

    def decide(self, sig: Signature, proto: int, port: int) -> Value | None:
        """The verdict at one port for a peer matching `sig`; None: no policy decides (allowed)."""
        for ri, ps in sig:
            if self.rules[ri].layer is Layer.ISTIO_DENY and P.contains(ps, proto, port):
                return Verdict.DENY, self.indices[ri]
        np_rule = None
        if self.np_default is not None:
            np_rule = next((self.indices[ri] for ri, ps in sig
                            if self.rules[ri].layer is Layer.NETWORK_POLICY and P.contains(ps, proto, port)), None)
            if np_rule is None:
                return Verdict.DENY, self.np_default
        if self.istio_default is not None and proto == P.TCP:
            allow = next((self.indices[ri] for ri, ps in sig
                          if self.rules[ri].layer is Layer.ISTIO_ALLOW and P.contains(ps, proto, port)), None)
            if allow is None:
                return Verdict.DENY, self.istio_default
            return Verdict.ALLOW, np_rule if np_rule is not None else allow
        if np_rule is not None:
            return Verdict.ALLOW, np_rule
        return None

    def segments(self, sig: Signature) -> tuple[Segment, ...]:
        """The decided port ranges of every protocol, adjacent equal ranges merged."""
        out: list[Segment] = []
        for proto in P.PROTO_NUMBERS:
            cuts = {0, P.PORT_MAX + 1}
            for _, ps in sig:
                for pp, lo, hi in ps:
                    if pp == proto:
                        cuts.add(lo)
                        cuts.add(hi + 1)
            edges = sorted(cuts)
            for a, b in zip(edges, edges[1:], strict=False):
                v = self.decide(sig, proto, a)
                if v is None:
                    continue
                if out and out[-1][0] == proto and out[-1][2] == a - 1 and out[-1][3:] == v:
                    out[-1] = (proto, out[-1][1], b - 1, *v)
                else:
                    out.append((proto, a, b - 1, *v))
        return tuple(out)


def _cover(segs: Iterable[Segment], proto: int) -> list[tuple[int, int, Value | None]]:
    """One protocol's segments as a full cover of 0..65535 (None where undecided)."""
    out: list[tuple[int, int, Value | None]] = []
    at = 0
    for p, lo, hi, v, r in segs:
        if p != proto:
            continue
        if lo > at:
            out.append((at, lo - 1, None))
        out.append((lo, hi, (v, r)))
        at = hi + 1
    if at <= P.PORT_MAX:
        out.append((at, P.PORT_MAX, None))
    return out


def peer_template(peer: tuple[Segment, ...], any_: tuple[Segment, ...]) -> list[tuple[int, int, int, PolicyValue]]:
    """A peer's entries (proto, port, bits, value): where its verdict or rule differs from ANY's."""
    out: list[tuple[int, int, int, PolicyValue]] = []
    for proto in P.PROTO_NUMBERS:
        a, b = _cover(peer, proto), _cover(any_, proto)
        cuts = sorted({lo for lo, _, _ in a} | {lo for lo, _, _ in b} | {P.PORT_MAX + 1})
        ia = ib = 0
        run: tuple[int, int, Value] | None = None
        runs: list[tuple[int, int, Value]] = []
        for lo, nxt in zip(cuts, cuts[1:], strict=False):
            while a[ia][1] < lo:
                ia += 1
            while b[ib][1] < lo:
                ib += 1
            va, vb = a[ia][2], b[ib][2]
            if va == vb:
                continue
            v = va if va is not None else (Verdict.ALLOW, RULE_DEFAULT_ALLOW)
            if run is not None and run[1] == lo - 1 and run[2] == v:
                run = (run[0], nxt - 1, v)
            else:
                if run is not None:
                    runs.append(run)
                run = (lo, nxt - 1, v)
        if run is not None:
            runs.append(run)
        for lo, hi, v in runs:
            value = PolicyValue(int(v[0]), v[1])
            out += [(proto, port, bits, value) for port, bits in P.prefixes(lo, hi)]
    return out


def any_template(segs: tuple[Segment, ...]) -> list[tuple[int, int, int, PolicyValue]]:
    return [(proto, port, bits, PolicyValue(int(v), r)) for proto, lo, hi, v, r in segs
            for port, bits in P.prefixes(lo, hi)]


def host_override(segs: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """HOST is allowed wherever a policy decides (Kubernetes: a pod's own node is always allowed)."""
    out: list[Segment] = []
    for proto, lo, hi, _, _ in segs:
        if out and out[-1][0] == proto and out[-1][2] == lo - 1:
            out[-1] = (proto, out[-1][1], hi, Verdict.ALLOW, RULE_HOST)
        else:
            out.append((proto, lo, hi, Verdict.ALLOW, RULE_HOST))
    return tuple(out)


# --- the rule table -------------------------------------------------------------------------------


class RuleTable:
    """Rule index <-> RuleRef. An unchanged rule keeps its index across recompiles; a released index is
    reused only after `settle()` (once the diff that stopped using it is out)."""

    def __init__(self) -> None:
        self.rules: dict[int, RuleInfo] = {
            RULE_DEFAULT_ALLOW: RuleInfo(RULE_DEFAULT_ALLOW, RuleRef("", "", "", "default-allow"), Verdict.ALLOW,
                                         "no policy isolates the subject in this direction and no DENY rule matches"),
            RULE_HOST: RuleInfo(RULE_HOST, RuleRef("", "", "", "host"), Verdict.ALLOW,
                                "traffic between a pod and its own node is always allowed"),
        }
        self.index: dict[RuleRef, int] = {}
        self._refs: dict[RuleRef, int] = {}
        self._free: list[int] = []
        self._quarantine: list[int] = []
        self._next = FIRST_POLICY_RULE

    def hold(self, ref: RuleRef, verdict: Verdict, text: str) -> int:
        i = self.index.get(ref)
        if i is None:
            i = heapq.heappop(self._free) if self._free else self._next
            self._next = max(self._next, i + 1)
            self.index[ref] = i
        self._refs[ref] = self._refs.get(ref, 0) + 1
        self.rules[i] = RuleInfo(i, ref, verdict, text)
        return i

    def release(self, ref: RuleRef) -> None:
        left = self._refs[ref] - 1
        if left:
            self._refs[ref] = left
            return
        del self._refs[ref]
        i = self.index.pop(ref)
        del self.rules[i]
        self._quarantine.append(i)

    def settle(self) -> None:
        for i in self._quarantine:
            heapq.heappush(self._free, i)
        self._quarantine.clear()


# --- the compiler ---------------------------------------------------------------------------------


class PolicyCompiler:
    """Incremental; single-threaded (feed it from the agent's apply loop, as a ChangeSet subscriber).
    `on_problem(reason, object, message)` hears each problem once when it appears (log, metrics, a
    Kubernetes Event: accel/events.py); without one, problems are logged here."""

    def __init__(self, options: PolicyOptions | None = None, on_problem: ObjectProblemReporter | None = None) -> None:
        self.options = options or PolicyOptions()
        self.on_problem = on_problem
        self.peers = PeerIndex(self.options.trust_domain)
        self.cidr_ids = CidrIdentities()
        self.rule_table = RuleTable()
        self.entries: dict[PolicyKey, PolicyValue] = {}
        self.ipcache: dict[str, int] = {}
        self.synced = False
        self._workloads: dict[ObjectKey, Workload] = {}
        self._pods_of: dict[int, set[ObjectKey]] = {}
        self._local: dict[int, int] = {}  # identity -> pods of it on this node (subjects)
        self._subjects_by_ns: dict[str, set[int]] = {}
        self._ns_labels: dict[str, Mapping[str, str]] = {}
        self._policies: dict[ObjectKey, PolicyRules] = {}
        self._policies_by_ns: dict[str, set[ObjectKey]] = {}  # scope namespace ("" = every namespace)
        self._rule_ids: dict[ObjectKey, tuple[int, ...]] = {}  # rule-table indices of each policy's rules
        self._default_ids: dict[ObjectKey, int] = {}
        self._entries_of: dict[int, dict[int, dict[PolicyKey, PolicyValue]]] = {}  # subject -> peer -> entries
        self._decisions: dict[int, tuple[Decision | None, Decision | None]] = {}  # subject -> (ingress, egress)
        self._local_changed: set[int] = set()  # identities that became or stopped being subjects
        self._explicit_of: dict[int, frozenset[int]] = {}
        self._explicit_users: dict[int, set[int]] = {}
        self._matchers_of: dict[int, frozenset[Matcher]] = {}
        self._matcher_users: dict[Matcher, set[int]] = {}
        self._problems: dict[ObjectKey, tuple[Problem, ...]] = {}
        self._port_problems: dict[ObjectKey, tuple[Problem, ...]] = {}
        self._reported: set[tuple[str, ObjectKey, str]] = set()
        self.problems_total: dict[str, int] = {}  # by reason, each problem counted once when it appears

    # --- reading ------------------------------------------------------------------------------

    def compiled(self) -> Compiled:
        problems = tuple(p for k in sorted(self._problems.keys() | self._port_problems.keys())
                         for p in (*self._problems.get(k, ()), *self._port_problems.get(k, ())))
        return Compiled(MappingProxyType(self.entries), MappingProxyType(self.ipcache),
                        MappingProxyType(self.rule_table.rules), problems)

    def rule(self, index: int) -> RuleInfo | None:
        """A rule of the table by its index (what a kernel deny names), without building `compiled()`."""
        return self.rule_table.rules.get(index)

    @property
    def subjects(self) -> frozenset[int]:
        return frozenset(self._local)

    def policy(self, key: ObjectKey) -> PolicyRules | None:
        return self._policies.get(key)

    def selected_subjects(self, key: ObjectKey) -> set[int]:
        """The subjects (local pod identities) a policy applies to now."""
        pol = self._policies.get(key)
        return self._selected(pol) if pol is not None else set()

    def facts(self, identity: int) -> PeerFacts | None:
        return self.peers.facts.get(identity)

    def verdict(self, subject: int, peer: int, direction: Direction, proto: int, port: int) -> tuple[Verdict, int]:
        """Any subject's verdict, a pod's of another node too, straight from the rules: what that node's
        kernel decides. (This node's subjects: `evaluate()` over the entries gives the same.) For closing
        this node's connections to pods elsewhere that a change no longer allows."""
        facts = self.peers.facts.get(subject)
        dec = self.decision(facts, direction) if facts is not None else None
        if facts is None or dec is None:
            return Verdict.ALLOW, RULE_NONE
        if peer == ID_HOST and self.options.host_always_allowed:
            return Verdict.ALLOW, RULE_HOST
        v = dec.decide(self._signature(facts, direction, dec, peer), proto, port)
        return (Verdict(v[0]), v[1]) if v is not None else (Verdict.ALLOW, RULE_NONE)

    # --- following the model --------------------------------------------------------------------

    def on_change(self, cs: ChangeSet) -> PolicyDiff:
        # Subjects to compile again whole (their policies or their own facts changed), and subjects
        # of which only some peers changed (new, gone or different identities): those peers only.
        full: set[int] = set()
        peer_dirty: dict[int, set[int]] = {}

        def peers_changed(subjects: set[int], peer: int) -> None:
            for subject in subjects:
                peer_dirty.setdefault(subject, set()).add(peer)

        touched: set[int] = set()
        ipcache_before = dict(self.ipcache)
        for ch in cs.changes:
            if ch.key.kind is Kind.NAMESPACE:
                ns = ch.new if isinstance(ch.new, Namespace) else None
                labels = ns.labels if ns is not None else EMPTY_MAP
                if dict(self._ns_labels.get(ch.key.name, EMPTY_MAP)) != dict(labels):
                    self._ns_labels[ch.key.name] = labels
                    touched |= self.peers.identities_in(ch.key.name)
        for wc in cs.workloads:
            for w, add in ((wc.old, False), (wc.new, True)):
                if w is None or not policy_pod(w):
                    continue
                self._track(w, add)
                touched.add(w.security_identity)
        full |= self._local_changed
        self._local_changed.clear()
        for i in sorted(touched):
            old = self.peers.facts.get(i)
            facts = self._identity_facts(i)
            if facts == old:
                continue
            peers_changed(self._set_facts(i, facts), i)
            if old is None or facts is None or old.named_ports != facts.named_ports:
                full.add(i)  # as a subject: named ports resolve on it (ingress)
        new_problems: list[Problem] = []
        for ch in cs.changes:
            if ch.key.kind in (Kind.NETWORK_POLICY, Kind.AUTHORIZATION_POLICY):
                full |= self._replace_policy(ch.key, ch.new, new_problems)
        added, gone = self.cidr_ids.reconcile()
        for cidr, n in gone.items():
            del self.ipcache[cidr]
            peers_changed(self._set_facts(n, None), n)
        for cidr, n in added.items():
            self.ipcache[cidr] = n
            peers_changed(self._set_facts(n, PeerFacts(n, PeerKind.CIDR, cidr=cidr)), n)
        if cs.synced and not self.synced:
            self.synced = True
            for key in sorted(self._policies):
                new_problems += self._check_named_ports(key)
        elif self.synced:
            for key in sorted({ch.key for ch in cs.changes if ch.key in self._policies}):
                new_problems += self._check_named_ports(key)
        return self._recompile(full, peer_dirty, ipcache_before, added, gone, new_problems)

    def _track(self, w: Workload, add: bool) -> None:
        i, key = w.security_identity, w.key
        pods = self._pods_of.setdefault(i, set())
        local = self.options.node is None or w.pod.node == self.options.node
        if add:
            self._workloads[key] = w
            pods.add(key)
            if local:
                n = self._local[i] = self._local.get(i, 0) + 1
                if n == 1:
                    self._subjects_by_ns.setdefault(w.pod.namespace, set()).add(i)
                    self._local_changed.add(i)
        else:
            self._workloads.pop(key, None)
            pods.discard(key)
            if not pods:
                del self._pods_of[i]
            if local:
                left = self._local.get(i, 0) - 1
                if left > 0:
                    self._local[i] = left
                elif self._local.pop(i, None) is not None:
                    self._local_changed.add(i)
                    group = self._subjects_by_ns[w.pod.namespace]
                    group.discard(i)
                    if not group:
                        del self._subjects_by_ns[w.pod.namespace]

    def _identity_facts(self, i: int) -> PeerFacts | None:
        keys = self._pods_of.get(i)
        if not keys:
            return None
        pods = [self._workloads[k].pod for k in keys]
        p = pods[0]
        return PeerFacts(i, PeerKind.POD, p.namespace, p.service_account, p.labels,
                         self._ns_labels.get(p.namespace, EMPTY_MAP),
                         frozenset(cp for q in pods for cp in q.named_ports),
                         frozenset(ip for q in pods for ip in q.ips))

    def _set_facts(self, i: int, facts: PeerFacts | None) -> set[int]:
        """Store an identity's facts; the subjects whose entries for it may change."""
        dirty = set(self._explicit_users.get(i, ()))
        for m in self.peers.set_facts(i, facts):
            dirty |= self._matcher_users.get(m, set())
        return dirty

    def _replace_policy(self, key: ObjectKey, record: object, new_problems: list[Problem]) -> set[int]:
        old = self._policies.get(key)
        new: PolicyRules | None = None
        if isinstance(record, NetworkPolicy):
            new = normalize_network_policy(record)
        elif isinstance(record, AuthorizationPolicy):
            new = normalize_authorization_policy(record, self.options.root_namespace)
        dirty: set[int] = set()
        if new is not None:  # hold the new before releasing the old: shared matchers, CIDRs and rules stay
            for m in new.matchers:
                self.peers.hold(m)
            for cidr in new.cidrs:
                self.cidr_ids.hold(cidr)
            ids = tuple(self.rule_table.hold(r.ref, r.verdict, r.text) for r in new.rules)
            if new.default is not None:
                self._default_ids[key] = self.rule_table.hold(new.default, Verdict.DENY, new.default_text)
            self._rule_ids[key] = ids
            self._policies[key] = new
            self._policies_by_ns.setdefault(new.scope.namespace, set()).add(key)
            dirty |= self._selected(new)
            self._problems[key] = new.problems
            for p in new.problems:
                if self._report(p):
                    new_problems.append(p)
        if old is not None:
            dirty |= self._selected(old)
            for m in old.matchers:
                self.peers.release(m)
            for cidr in old.cidrs:
                self.cidr_ids.release(cidr)
            for r in old.rules:
                self.rule_table.release(r.ref)
            if old.default is not None:
                self.rule_table.release(old.default)
            if new is None:
                self._default_ids.pop(key, None)
                self._rule_ids.pop(key, None)
                del self._policies[key]
                self._problems.pop(key, None)
                self._port_problems.pop(key, None)
            if new is None or new.scope.namespace != old.scope.namespace:
                keys = self._policies_by_ns[old.scope.namespace]
                keys.discard(key)
                if not keys:
                    del self._policies_by_ns[old.scope.namespace]
        return dirty

    def _selected(self, pol: PolicyRules) -> set[int]:
        """The subjects a policy's scope selects now."""
        ns = pol.scope.namespace
        candidates = self._subjects_by_ns.get(ns, set()) if ns else self._local.keys()
        return {i for i in candidates if (f := self.peers.facts.get(i)) is not None and pol.scope.selects(f)}

    def _check_named_ports(self, key: ObjectKey) -> list[Problem]:
        """A NetworkPolicy port name that is the name of no container port it could mean."""
        pol = self._policies.get(key)
        found: list[Problem] = []
        if pol is not None:
            for r in pol.rules:
                for name, proto in r.named_ports:
                    if r.direction is Direction.INGRESS:
                        holders = [f for f in self.peers.facts.values()
                                   if f.kind is PeerKind.POD and pol.scope.selects(f) and f.port_named(name, proto)]
                        whose = "the pods the policy selects"
                    else:
                        holders = [f for f in self.peers.facts.values()
                                   if f.kind is PeerKind.POD and f.port_named(name, proto)]
                        whose = "any pod"
                    if not holders:
                        proto_name = {v: k for k, v in P.PROTOCOLS.items()}[proto]
                        found.append(Problem("network_policy_port_unresolved", key,
                                             f"object={key} {r.ref.part} port {name!r} ({proto_name}) is the name of "
                                             f"no container port of {whose}; it matches no port"))
        self._port_problems[key] = tuple(found)
        return [p for p in found if self._report(p)]

    def _report(self, p: Problem) -> bool:
        mark = (p.reason, p.object, p.message)
        if mark in self._reported:
            return False
        if len(self._reported) > 100_000:
            self._reported.clear()
        self._reported.add(mark)
        self.problems_total[p.reason] = self.problems_total.get(p.reason, 0) + 1
        if self.on_problem is not None:  # the agent's reporter logs and counts
            self.on_problem(p.reason, p.object, p.message)
        else:
            log.warning("event=bad_input component=policy reason=%s %s", p.reason, p.message)
        return True

    # --- compiling subjects -------------------------------------------------------------------

    def _recompile(self, full: set[int], peer_dirty: dict[int, set[int]], ipcache_before: dict[str, int],
                   added: dict[str, int], gone: dict[str, int], problems: list[Problem]) -> PolicyDiff:
        # A new CIDR's identity starts as a copy of what its addresses resolved to (write order, step 1).
        copies: dict[int, dict[int, dict[PolicyKey, PolicyValue]]] = {}
        for cidr, n in added.items():
            was = _longest(ipcache_before, cidr)
            for s in sorted(self._explicit_users.get(was, ())):
                got = {k._replace(peer=n): v for k, v in self._entries_of.get(s, {}).get(was, {}).items()}
                if got:
                    copies.setdefault(s, {})[n] = got
                    peer_dirty.setdefault(s, set()).add(n)
        ghost_of = {n: _longest(self.ipcache, cidr) for cidr, n in gone.items()}
        ops: dict[str, list[MapOp]] = {phase: [] for phase in ("peer+", "any+", "any-", "peer-", "ghost-")}
        done = []
        for s in sorted(full | peer_dirty.keys()):
            old_all = self._entries_of.get(s, {})
            if s not in self._local or s not in self.peers.facts:
                new_all: dict[int, dict[PolicyKey, PolicyValue]] = {}
                self._index_subject(s, frozenset(), frozenset())
                self._decisions.pop(s, None)
                diff_peers = set(old_all)
            elif s in full:
                new_all = self._compile_subject(s)
                diff_peers = old_all.keys() | new_all.keys()
            else:
                new_all = dict(old_all)
                diff_peers = peer_dirty[s]
                self._update_peers(s, diff_peers, new_all)
            mine = copies.get(s, {})
            diff_peers = diff_peers | mine.keys() | {n for n, there in ghost_of.items() if there in new_all}
            for p in diff_peers:
                before = old_all.get(p, {})
                after = new_all.get(p, {})
                for k in before.keys() - after.keys():
                    del self.entries[k]
                self.entries.update(after)
                target = after
                if p in ghost_of:  # leaves as a ghost of what its addresses will resolve to (steps 6-8)
                    target = {k._replace(peer=p): v for k, v in new_all.get(ghost_of[p], {}).items()}
                    ops["ghost-"] += [MapOp(POLICY_MAP, k, None) for k in target]
                written = mine.get(p, before)
                for k, v in target.items():
                    if written.get(k) != v:
                        ops["any+" if p == ID_ANY else "peer+"].append(MapOp(POLICY_MAP, k, v))
                for k in written.keys() - target.keys():
                    ops["any-" if p == ID_ANY else "peer-"].append(MapOp(POLICY_MAP, k, None))
            if new_all:
                self._entries_of[s] = new_all
            else:
                self._entries_of.pop(s, None)
            done.append(s)
        copy_ops = [MapOp(POLICY_MAP, k, v) for s in sorted(copies) for got in copies[s].values() for k, v in got.items()]
        ipcache_up = [MapOp(IPCACHE_MAP, c, n) for c, n in added.items()]
        ipcache_rm = [MapOp(IPCACHE_MAP, c, None) for c in gone]
        self.cidr_ids.settle()
        self.rule_table.settle()
        return PolicyDiff((*copy_ops, *ipcache_up, *ops["peer+"], *ops["any+"], *ops["any-"], *ops["peer-"],
                           *ipcache_rm, *ops["ghost-"]), tuple(done), tuple(problems))

    def applicable(self, facts: PeerFacts) -> list[PolicyRules]:
        """The policies whose scope selects a subject, in a stable order."""
        keys = self._policies_by_ns.get(facts.namespace, set()) | self._policies_by_ns.get("", set())
        pols = [p for k in keys if (p := self._policies[k]).scope.selects(facts)]
        return sorted(pols, key=lambda p: p.sort_key)

    def decision(self, facts: PeerFacts, direction: Direction) -> Decision | None:
        """The rules deciding one subject's traffic in one direction; None when nothing applies."""
        pols = self.applicable(facts)
        ordered: list[tuple[Layer, tuple[str, str, str], int, Rule, int]] = []
        np_default = istio_default = None
        for pol in pols:
            key = ObjectKey(Kind(pol.kind), pol.namespace, pol.name)
            for pos, (r, idx) in enumerate(zip(pol.rules, self._rule_ids[key], strict=True)):
                if r.direction is direction:
                    ordered.append((r.layer, pol.sort_key, pos, r, idx))
            if direction in pol.isolates:
                if pol.kind == Kind.NETWORK_POLICY and np_default is None:
                    np_default = self._default_ids[key]
                elif pol.kind == Kind.AUTHORIZATION_POLICY and istio_default is None:
                    istio_default = self._default_ids[key]
        if not ordered and np_default is None and istio_default is None:
            return None
        ordered.sort(key=lambda t: t[:3])
        return Decision(tuple(t[3] for t in ordered), tuple(t[4] for t in ordered), np_default, istio_default)

    def _compile_subject(self, s: int) -> dict[int, dict[PolicyKey, PolicyValue]]:
        facts = self.peers.facts[s]
        out: dict[int, dict[PolicyKey, PolicyValue]] = {}
        explicit_all: set[int] = set()
        matchers_all: set[Matcher] = set()
        decisions: list[Decision | None] = []
        for direction in (Direction.INGRESS, Direction.EGRESS):
            dec = self.decision(facts, direction)
            decisions.append(dec)
            if dec is None:
                continue
            matchers = _matchers(dec, direction)
            explicit: set[int] = set()
            for m in matchers:
                explicit |= self.peers.members(m)
            if self.options.host_always_allowed:
                explicit.add(ID_HOST)
            matchers_all |= matchers
            explicit_all |= explicit
            self._emit(s, facts, direction, dec, explicit, out)
        self._decisions[s] = (decisions[0], decisions[1])
        self._index_subject(s, frozenset(explicit_all), frozenset(matchers_all))
        return out

    def _update_peers(self, s: int, peers: set[int], out: dict[int, dict[PolicyKey, PolicyValue]]) -> None:
        """Only some peers of a subject changed (its policies did not): their entries, nothing else."""
        facts = self.peers.facts[s]
        matchers = self._matchers_of.get(s, frozenset())
        explicit = set(self._explicit_of.get(s, ()))
        for p in peers:
            out.pop(p, None)
            host = p == ID_HOST and self.options.host_always_allowed
            if not host and not any(p in self.peers.members(m) for m in matchers):
                explicit.discard(p)
                continue
            explicit.add(p)
            for direction, dec in zip((Direction.INGRESS, Direction.EGRESS), self._decisions.get(s, (None, None)),
                                      strict=True):
                if dec is None:
                    continue
                any_segs = dec.segments(self._signature(facts, direction, dec, ID_ANY))
                sig = self._signature(facts, direction, dec, p)
                mine = dec.segments(sig)
                if host:
                    mine = host_override(mine)
                elif mine == any_segs:
                    continue
                entries = out.setdefault(p, {})
                for proto, port, bits, value in peer_template(mine, any_segs):
                    entries[PolicyKey(s, p, int(direction), proto, port, bits)] = value
        self._index_subject(s, frozenset(explicit), matchers)

    def _signature(self, facts: PeerFacts, direction: Direction, dec: Decision, p: int) -> Signature:
        """Which rules match one peer (ANY: 0) and on which ports (signatures() for one peer)."""
        out = []
        for ri, r in enumerate(dec.rules):
            if r.peers is not None and not any(all((p in self.peers.members(m)) != neg for m, neg in conj)
                                               for conj in r.peers):
                continue
            ps = self._rule_ports(r, facts, direction, p)
            if ps:
                out.append((ri, ps))
        return tuple(out)

    def _rule_ports(self, r: Rule, facts: PeerFacts, direction: Direction, p: int) -> P.PortSet:
        if not r.named_ports:
            return r.ports
        on = facts if direction is Direction.INGRESS else self.peers.facts.get(p)  # whose names they are
        if on is None:
            return r.ports
        return P.union(r.ports, P.portset((proto, n, n) for name, proto in r.named_ports
                                          for n in on.port_named(name, proto)))

    def signatures(self, facts: PeerFacts, direction: Direction, dec: Decision,
                   peers: set[int]) -> dict[int, Signature]:
        """Which rules match each peer (and ANY, 0) and on which ports."""
        universe = peers | {ID_ANY}
        sigs: dict[int, list[tuple[int, P.PortSet]]] = {p: [] for p in universe}
        for ri, r in enumerate(dec.rules):
            matched = self._match(r.peers, universe)
            if not matched:
                continue
            per_peer = bool(r.named_ports) and direction is Direction.EGRESS  # resolved on each peer
            ps = r.ports if per_peer else self._rule_ports(r, facts, direction, ID_ANY)
            for p in matched:
                pp = self._rule_ports(r, facts, direction, p) if per_peer else ps
                if pp:
                    sigs[p].append((ri, pp))
        return {p: tuple(v) for p, v in sigs.items()}

    def _match(self, peers: tuple[Conj, ...] | None, universe: set[int]) -> set[int]:
        if peers is None:
            return universe
        out: set[int] = set()
        for conj in peers:
            pos = sorted((self.peers.members(m) for m, neg in conj if not neg), key=len)
            base = set(pos[0]).intersection(*pos[1:]) if pos else set(universe)
            for m, neg in conj:
                if neg:
                    base -= self.peers.members(m)
            out |= base
        return out

    def _emit(self, s: int, facts: PeerFacts, direction: Direction, dec: Decision, explicit: set[int],
              out: dict[int, dict[PolicyKey, PolicyValue]]) -> None:
        sigs = self.signatures(facts, direction, dec, explicit)
        seg_cache: dict[Signature, tuple[Segment, ...]] = {}

        def segs(sig: Signature) -> tuple[Segment, ...]:
            v = seg_cache.get(sig)
            if v is None:
                v = seg_cache[sig] = dec.segments(sig)
            return v

        any_sig = sigs[ID_ANY]
        any_segs = segs(any_sig)
        d = int(direction)
        for proto, port, bits, value in any_template(any_segs):
            out.setdefault(ID_ANY, {})[PolicyKey(s, ID_ANY, d, proto, port, bits)] = value
        templates: dict[tuple[bool, Signature], list[tuple[int, int, int, PolicyValue]]] = {}
        for p in explicit:
            sig = sigs[p]
            host = p == ID_HOST and self.options.host_always_allowed
            if sig == any_sig and not host:
                continue
            t = templates.get((host, sig))
            if t is None:
                mine = host_override(segs(sig)) if host else segs(sig)
                t = templates[(host, sig)] = peer_template(mine, any_segs)
            if t:
                entries = out.setdefault(p, {})
                for proto, port, bits, value in t:
                    entries[PolicyKey(s, p, d, proto, port, bits)] = value

    def _index_subject(self, s: int, explicit: frozenset[int], matchers: frozenset[Matcher]) -> None:
        old_e = self._explicit_of.get(s, frozenset())
        for p in old_e - explicit:
            users = self._explicit_users[p]
            users.discard(s)
            if not users:
                del self._explicit_users[p]
        for p in explicit - old_e:
            self._explicit_users.setdefault(p, set()).add(s)
        old_m = self._matchers_of.get(s, frozenset())
        for m in old_m - matchers:
            musers = self._matcher_users[m]
            musers.discard(s)
            if not musers:
                del self._matcher_users[m]
        for m in matchers - old_m:
            self._matcher_users.setdefault(m, set()).add(s)
        if explicit or matchers:
            self._explicit_of[s] = explicit
            self._matchers_of[s] = matchers
        else:
            self._explicit_of.pop(s, None)
            self._matchers_of.pop(s, None)
