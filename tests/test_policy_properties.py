"""Properties of the policy compiler on random clusters (hypothesis):
- the entries, read with the kernel's algorithm (evaluate), give the verdict of a direct reading of
  the policies (tests/policy_reference.py) for every subject, peer, direction, protocol and port;
- after any sequence of changes, the incrementally maintained entries equal a full recompile's, and
  the diffs, written in order, turn the maps into exactly that;
- while one diff is written, op by op, every (subject, peer, port) has its old or its new verdict.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accel.policy.compiler import PolicyCompiler, PolicyOptions, policy_pod
from accel.policy.evaluate import compile_all, evaluate, identity_of_address
from accel.policy.peers import CidrBlock, IstioIpBlocks, PeerKind
from accel.policy.rbac import inbound_rbac
from accel.policy.types import Compiled, Direction, PolicyKey, PolicyValue, RuleRef, Verdict
from accel.state.identity import CIDR_MAX, CIDR_MIN, ID_HOST, ID_REMOTE_NODE
from accel.state.model import AuthorizationPolicy, Event, EventType, Kind, Namespace, NetworkPolicy, Workload
from accel.state.parse import parse_object
from accel.state.store import ClusterState
from tests import policy_reference as ref
from tests.policy_cluster import MapMirror, authz, netpol, ns, pod

pytestmark = pytest.mark.unit

NAMESPACES = ["a", "b", "istio-system"]
ADDRESSES = ["10.1.2.3", "10.1.3.3", "10.2.0.1", "192.168.1.1", "192.168.2.2", "172.16.5.5", "8.8.8.8",
             "10.244.0.200"]
PORTS = [0, 53, 79, 80, 81, 5000, 5005, 5010, 5011, 8080, 8081, 9090, 65535]
PROTOS = [6, 17, 132]
UNKNOWN_IDENTITY = 0x7777_7777

selectors = st.sampled_from([
    {}, {"matchLabels": {"app": "web"}}, {"matchLabels": {"app": "db"}}, {"matchLabels": {"team": "x"}},
    {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]},
    {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]},
    {"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["y"]}]},
])
ip_block_peers = st.sampled_from([{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                     {"ipBlock": {"cidr": "10.1.2.0/24"}},
                     {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}},
                     {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}},
                     {"ipBlock": {"cidr": "10.244.0.0/16"}}])
bad_peers = st.sampled_from([{"ipBlock": {"cidr": "10.0.0.0/33"}},  # invalid: the rule allows nothing
                             {"podSelector": {}, "nodeSelector": {}}])  # unknown field
np_peers = st.one_of(
    ip_block_peers,
    st.builds(lambda s: {"podSelector": s}, selectors),
    st.builds(lambda s: {"namespaceSelector": s}, selectors),
    st.builds(lambda a, b: {"namespaceSelector": a, "podSelector": b}, selectors, selectors),
    ip_block_peers,
)
np_ports = st.sampled_from([{}, {"port": 80}, {"port": 5000, "endPort": 5010}, {"port": "http"},
                            {"port": "dns", "protocol": "UDP"}, {"protocol": "UDP"}, {"port": 53, "protocol": "UDP"},
                            {"port": 9090}, {"port": 80, "protocol": "SCTP"}, {"port": "metrics"}])


@st.composite
def np_rules(draw: st.DrawFn, peers_field: str) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if draw(st.integers(0, 3)) > 0:
        rule[peers_field] = draw(st.lists(np_peers, min_size=1, max_size=2))
        if draw(st.integers(0, 12)) == 0:
            rule[peers_field].append(draw(bad_peers))
    if draw(st.booleans()):
        rule["ports"] = draw(st.lists(np_ports, max_size=2))
    return rule


@st.composite
def network_policies(draw: st.DrawFn, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": draw(selectors)}
    types = draw(st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    if types is not None:
        spec["policyTypes"] = types
    if draw(st.integers(0, 3)) > 0:
        spec["ingress"] = draw(st.lists(np_rules("from"), min_size=1, max_size=2))
    if draw(st.integers(0, 3)) > 0:
        spec["egress"] = draw(st.lists(np_rules("to"), min_size=1, max_size=2))
    if draw(st.integers(0, 15)) == 0:
        spec["ingres"] = []  # unknown field: isolates, allows nothing
    return netpol(name, draw(st.sampled_from(NAMESPACES[:2])), spec)


principals = st.sampled_from(["cluster.local/ns/a/sa/default", "cluster.local/ns/b/sa/s1", "*",
                              "cluster.local/ns/a/*", "*/sa/s1"])
namespace_patterns = st.sampled_from(["a", "b", "*", "istio-*"])
blocks = st.sampled_from(["10.244.0.0/24", "10.244.0.1", "192.168.0.0/16", "0.0.0.0/0", "10.1.0.0/16", "10.0.0.0/8"])


@st.composite
def sources(draw: st.DrawFn) -> dict[str, Any]:
    fields = {"principals": principals, "notPrincipals": principals, "namespaces": namespace_patterns,
              "notNamespaces": namespace_patterns, "ipBlocks": blocks, "notIpBlocks": blocks,
              "requestPrincipals": st.just("issuer/subject")}
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True))
    return {f: draw(st.lists(fields[f], min_size=1, max_size=2)) for f in chosen}


operations = st.sampled_from([{}, {"ports": ["80"]}, {"ports": ["80", "8080"]}, {"notPorts": ["8080"]},
                              {"methods": ["GET"]}, {"ports": ["53"], "paths": ["/x"]}])
conditions = st.sampled_from([{"key": "source.namespace", "values": ["a"]},
                              {"key": "source.principal", "notValues": ["cluster.local/ns/b/sa/s1"]},
                              {"key": "source.ip", "values": ["10.244.0.0/16"]},
                              {"key": "destination.port", "notValues": ["80"]},
                              {"key": "request.headers[x-user]", "values": ["me"]}])


@st.composite
def authz_rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if draw(st.booleans()):
        rule["from"] = [{"source": s} for s in draw(st.lists(sources(), max_size=2))]
    if draw(st.booleans()):
        rule["to"] = [{"operation": o} for o in draw(st.lists(operations, max_size=2))]
    if draw(st.integers(0, 3)) == 0:
        rule["when"] = draw(st.lists(conditions, min_size=1, max_size=2))
    return rule


@st.composite
def authorization_policies(draw: st.DrawFn, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"action": draw(st.sampled_from(["ALLOW", "ALLOW", "DENY", "DENY", "AUDIT"]))}
    if draw(st.booleans()):
        spec["selector"] = {"matchLabels": draw(st.sampled_from([{"app": "web"}, {"app": "db"}, {"tier": "fe"}]))}
    if draw(st.integers(0, 5)) > 0:
        spec["rules"] = draw(st.lists(authz_rules(), max_size=2))
    return authz(name, draw(st.sampled_from(NAMESPACES)), spec)


@st.composite
def pods(draw: st.DrawFn, i: int) -> dict[str, Any]:
    named = draw(st.lists(st.sampled_from([("http", 8080, "TCP"), ("http", 8081, "TCP"), ("dns", 53, "UDP"),
                                           ("metrics", 9090, "TCP")]), max_size=2, unique_by=lambda t: t[0]))
    extra = [f"10.250.0.{i + 1}"] if draw(st.integers(0, 4)) == 0 else []
    return pod(f"p{i}", draw(st.sampled_from(NAMESPACES[:2])), f"10.244.0.{i + 1}",
               draw(st.sampled_from([{}, {"app": "web"}, {"app": "db"}, {"app": "web", "tier": "fe"}, {"app": "api"}])),
               sa=draw(st.sampled_from(["default", "s1"])), node=draw(st.sampled_from(["n1", "n2"])),
               ports=named, ips=extra, host_network=draw(st.integers(0, 12)) == 0)


@st.composite
def clusters(draw: st.DrawFn) -> list[dict[str, Any]]:
    labels = st.sampled_from([{}, {"team": "x"}, {"team": "y"}, {"team": "x", "env": "prod"}])
    objs = [ns(n, **draw(labels)) for n in NAMESPACES]
    objs += [draw(pods(i)) for i in range(draw(st.integers(2, 7)))]
    n = draw(st.integers(1, 4))
    k = draw(st.integers(0, n))
    objs += [draw(network_policies(f"np{i}")) for i in range(k)]
    objs += [draw(authorization_policies(f"ap{i}")) for i in range(n - k)]
    return objs


# --- the model of the cluster the reference reads -------------------------------------------------


def _records(objs: Iterable[dict[str, Any]]) -> list[Any]:
    return [parse_object(o) for o in objs]


def _workloads(records: list[Any]) -> list[Workload]:
    state = ClusterState()
    state.apply([Event(EventType.ADDED, r) for r in records], synced=True)
    return state.workloads()


def _ref_pods(records: list[Any], workloads: list[Workload]) -> dict[int, ref.RefPod]:
    ns_labels = {r.name: dict(r.labels) for r in records if isinstance(r, Namespace)}
    out: dict[int, ref.RefPod] = {}
    for w in workloads:
        if not policy_pod(w):
            continue
        p, n = w.pod, w.security_identity
        old = out.get(n)
        named = {(c.name, c.protocol, c.port) for c in p.named_ports}
        ips = set(p.ips)
        if old is not None:
            named |= old.named_ports
            ips |= old.ips
        out[n] = ref.RefPod(p.namespace, p.service_account, dict(p.labels), ns_labels.get(p.namespace, {}),
                            frozenset(named), frozenset(ips))
    return out


def _policies(records: list[Any]) -> ref.RefPolicies:
    return ref.RefPolicies([r for r in records if isinstance(r, NetworkPolicy)],
                           [r for r in records if isinstance(r, AuthorizationPolicy)])


# --- 1. entries + evaluate() == a direct reading ---------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.lists(st.sampled_from(PORTS), min_size=4, max_size=6, unique=True))
def test_entries_agree_with_a_direct_reading_of_the_policies(objs: list[dict[str, Any]], ports: list[int]) -> None:
    records = _records(objs)
    workloads = _workloads(records)
    compiled = compile_all(records, workloads).compiled()
    pods_by_id = _ref_pods(records, workloads)
    pols = _policies(records)
    exact = {ip: w.security_identity for w in workloads if policy_pod(w) for ip in w.pod.ips}
    peers: list[tuple[int, ref.RefPeer]] = [(n, ref.RefPeer("pod", p)) for n, p in pods_by_id.items()]
    peers += [(identity_of_address(compiled, a, exact), ref.RefPeer("address", address=a)) for a in ADDRESSES]
    peers += [(ID_HOST, ref.RefPeer("host")), (ID_REMOTE_NODE, ref.RefPeer("remote-node")),
              (UNKNOWN_IDENTITY, ref.RefPeer("any"))]
    for s, subject in pods_by_id.items():
        for peer_id, peer in peers:
            for d in Direction:
                for proto in PROTOS:
                    for port in ports:
                        want = ref.allowed(pols, subject, peer, d is Direction.INGRESS, proto, port)
                        got, rule = evaluate(compiled, s, peer_id, d, proto, port)
                        assert (got is Verdict.ALLOW) == want, (subject, peer, d, proto, port, compiled.rules.get(rule))
                        info = compiled.rules.get(rule)
                        assert info is None or info.verdict is got  # the rule that decided says so


# --- 2. incremental == full recompile --------------------------------------------------------------


def _normalized(compiled: Compiled) -> dict[tuple[Any, ...], tuple[int, RuleRef | int]]:
    """Entries with CIDR identities as their CIDR text and rule indices as what they name (both are
    numbered in the order things appeared, which differs between histories)."""
    cidr_of = {n: c for c, n in compiled.ipcache.items()}

    def peer(n: int) -> Any:
        return cidr_of[n] if CIDR_MIN <= n <= CIDR_MAX else n

    return {(k.subject, peer(k.peer), k.direction, k.proto, k.port, k.port_bits):
            (v.verdict, compiled.rules[v.rule].ref if v.rule in compiled.rules else v.rule)
            for k, v in compiled.entries.items()}


def _edit(obj: dict[str, Any], i: int) -> dict[str, Any]:
    """A changed version of an object: other labels, other selector, other port."""
    o = copy.deepcopy(obj)
    if o["kind"] == "Pod":
        o["metadata"]["labels"] = [{"app": "db"}, {"app": "web"}, {}][i % 3]
        o["spec"]["nodeName"] = ["n1", "n2"][i % 2]
    elif o["kind"] == "Namespace":
        o["metadata"]["labels"] = [{"team": "y"}, {"team": "x"}, {}][i % 3]
    elif o["kind"] == "NetworkPolicy":
        o["spec"]["podSelector"] = [{}, {"matchLabels": {"app": "web"}}][i % 2]
    else:
        o["spec"]["action"] = ["DENY", "ALLOW"][i % 2]
    return o


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), clusters(), st.lists(st.tuples(st.sampled_from(["add", "edit", "delete"]), st.integers(0, 40)),
                                        max_size=12), st.sampled_from([None, "n1"]))
def test_incremental_diffs_equal_a_full_recompile(first: list[dict[str, Any]], more: list[dict[str, Any]],
                                                  steps: list[tuple[str, int]], node: str | None) -> None:
    state = ClusterState()
    options = PolicyOptions(node=node)
    compiler = PolicyCompiler(options)
    mirror = MapMirror()
    state.subscribe(lambda cs: mirror.apply(compiler.on_change(cs)))
    live: dict[tuple[str, str, str], dict[str, Any]] = {}

    def key(o: dict[str, Any]) -> tuple[str, str, str]:
        return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]

    state.apply([Event(EventType.ADDED, parse_object(o)) for o in first], synced=True)
    live.update({key(o): o for o in first})
    pool = {key(o): o for o in more}
    for action, i in steps:
        if action == "add" and pool:
            o = list(pool.values())[i % len(pool)]
            state.apply([Event(EventType.ADDED, parse_object(o))])
            live[key(o)] = o
        elif live:
            k = sorted(live)[i % len(live)]
            if action == "edit":
                live[k] = _edit(live[k], i)
                state.apply([Event(EventType.MODIFIED, parse_object(live[k]))])
            else:
                state.apply([Event(EventType.DELETED, parse_object(live.pop(k)))])
        assert mirror.entries == compiler.entries and mirror.ipcache == compiler.ipcache
        records = [r for k in (Kind.NAMESPACE, Kind.NETWORK_POLICY, Kind.AUTHORIZATION_POLICY)
                   for r in state.records(k).values()]
        full = compile_all(records, state.workloads(), options)
        assert _normalized(compiler.compiled()) == _normalized(full.compiled())
        assert set(compiler.ipcache) == set(full.ipcache)


# --- 3. every single write keeps each point at its old or its new verdict --------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.data())
def test_every_write_of_a_diff_keeps_old_or_new_verdicts(objs: list[dict[str, Any]], data: st.DataObject) -> None:
    state = ClusterState()
    compiler = PolicyCompiler()
    mirror = MapMirror()
    diffs = []
    state.subscribe(lambda cs: diffs.append(compiler.on_change(cs)))
    pods_and_ns = [o for o in objs if o["kind"] in ("Pod", "Namespace")]
    policies = [o for o in objs if o["kind"] not in ("Pod", "Namespace")]
    state.apply([Event(EventType.ADDED, parse_object(o)) for o in pods_and_ns], synced=True)
    before = data.draw(st.lists(st.sampled_from(policies), unique_by=lambda o: o["metadata"]["name"])) if policies else []
    state.apply([Event(EventType.ADDED, parse_object(o)) for o in before])
    for d in diffs:
        mirror.apply(d)
    # One policy change: a new policy, an edited one or a removed one.
    change = data.draw(st.sampled_from(["add", "edit", "delete"]))
    if change == "add" or not before:
        extra = data.draw(st.one_of(network_policies("new-np"), authorization_policies("new-ap")))
        event = Event(EventType.ADDED, parse_object(extra))
    elif change == "edit":
        event = Event(EventType.MODIFIED, parse_object(_edit(before[0], data.draw(st.integers(0, 3)))))
    else:
        event = Event(EventType.DELETED, parse_object(before[0]))
    n = len(diffs)
    state.apply([event])
    if len(diffs) == n:
        return
    diff = diffs[-1]
    subjects = sorted(compiler.subjects | {k.subject for k in mirror.entries})
    exact = {ip: w.security_identity for w in state.workloads() if policy_pod(w) for ip in w.pod.ips}
    peer_ids = sorted({k.peer for k in mirror.entries} | {k.peer for k in compiler.entries} | {UNKNOWN_IDENTITY})
    points = [(s, p, d, proto, port) for s in subjects for p in peer_ids for d in (0, 1) for proto in PROTOS
              for port in (53, 80, 5005, 8080)]

    def verdicts(c: Compiled) -> list[Verdict]:
        out = [evaluate(c, *pt)[0] for pt in points]
        # Addresses are resolved through the ipcache as it is at this step.
        out += [evaluate(c, s, identity_of_address(c, a, exact), d, 6, 80)[0]
                for s in subjects for a in ADDRESSES for d in (0, 1)]
        return out

    old = verdicts(mirror.compiled())
    new = verdicts(Compiled(dict(compiler.entries), dict(compiler.ipcache), {}, ()))

    def check() -> None:
        now = verdicts(mirror.compiled())
        for i, v in enumerate(now):
            assert v in (old[i], new[i]), (i, points[i] if i < len(points) else "address", v, old[i], new[i])

    mirror.apply(diff, after_op=check)
    assert mirror.entries == compiler.entries


def test_the_write_order_property_catches_a_bad_order() -> None:
    """The op-by-op check is not vacuous: deleting a peer's DENY before ANY's new DENY exists opens a hole."""
    entries = {PolicyKey(1, 7, 0, 6, 80, 16): PolicyValue(2, 16), PolicyKey(1, 0, 0, 6, 0, 0): PolicyValue(1, 17)}
    after = {PolicyKey(1, 0, 0, 6, 0, 0): PolicyValue(2, 18)}
    bad_order = [(PolicyKey(1, 7, 0, 6, 80, 16), None), (PolicyKey(1, 0, 0, 6, 0, 0), PolicyValue(2, 18))]
    table: dict[PolicyKey, Any] = dict(entries)
    seen = []
    for k, v in bad_order:
        if v is None:
            del table[k]
        else:
            table[k] = v
        seen.append(evaluate(Compiled(table, {}, {}, ()), 1, 7, 0, 6, 80)[0])
    assert Verdict.ALLOW in seen  # the hole the compiler's order never makes
    assert evaluate(Compiled(after, {}, {}, ()), 1, 7, 0, 6, 80)[0] is Verdict.DENY


# --- 4. the tunnel's RBAC gives the kernel's verdicts where a principal is one kind of peer --------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.lists(st.sampled_from(PORTS), min_size=3, max_size=5, unique=True))
def test_inbound_rbac_agrees_with_the_kernel_for_principals(objs: list[dict[str, Any]], ports: list[int]) -> None:
    records = _records(objs)
    compiler = compile_all(records, _workloads(records))
    compiled = compiler.compiled()
    if any(isinstance(m, CidrBlock | IstioIpBlocks) for m in compiler.peers.matchers()):
        return  # addresses are about the kernel's peers, never the tunnel's: deliberately different
    by_principal: dict[str, list[int]] = {}
    for f in compiler.peers.facts.values():
        if f.kind is PeerKind.POD:
            by_principal.setdefault("spiffe://" + f.principal("cluster.local"), []).append(f.number)
    for s in compiler.subjects:
        rbac = inbound_rbac(compiler, s)
        for principal, ids in by_principal.items():
            for port in ports:
                kernel = {evaluate(compiled, s, i, Direction.INGRESS, 6, port)[0] for i in ids}
                if len(kernel) == 1:  # pods of one principal agree: the tunnel must say the same
                    assert rbac.verdict(principal, port)[0] in kernel, (principal, port)
