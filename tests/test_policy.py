"""The policy compiler: every case of issue 10's lab list as (peer, port) pairs allowed and denied
through the compiled entries and the kernel's lookup (evaluate), bad input, and the shape of what the
kernel gets."""

from __future__ import annotations

import pytest

from accel.policy.compiler import PolicyCompiler
from accel.policy.evaluate import evaluate
from accel.policy.peers import Namespaces, PeerFacts, PeerIndex, PeerKind, Principals, principal_namespace
from accel.policy.ports import prefix_range
from accel.policy.rbac import inbound_rbac
from accel.policy.types import RULE_HOST, Direction, PolicyKey, Verdict
from accel.state.identity import CIDR_MAX, CIDR_MIN, ID_ANY, ID_HOST, ID_REMOTE_NODE, ID_WORLD
from accel.state.model import ChangeSet, Kind, ObjectKey
from tests.policy_cluster import TCP, UDP, Cluster, authz, netpol, ns, pod

pytestmark = pytest.mark.unit

ALLOW, DENY = Verdict.ALLOW, Verdict.DENY


@pytest.fixture
def c() -> Cluster:
    """Namespaces shop (db, api, batch), web (fe, other; team=web), evil; pods of distinct identities."""
    c = Cluster()
    c.apply(ns("shop", team="shop"), ns("web", team="web"), ns("evil", team="evil"),
            pod("db", "shop", "10.244.0.1", {"app": "db"}, sa="db", ports=[("web", 8080, "TCP"), ("dns", 53, "UDP")]),
            pod("api", "shop", "10.244.0.2", {"app": "api"}, sa="api"),
            pod("batch", "shop", "10.244.0.3", {"app": "batch"}),
            pod("fe", "web", "10.244.0.4", {"app": "fe"}, sa="fe"),
            pod("other", "web", "10.244.0.5", {"app": "other"}, sa="other"),
            pod("fe", "evil", "10.244.0.6", {"app": "fe"}, sa="fe"),
            pod("api", "web", "10.244.0.7", {"app": "api"}, sa="api"))
    return c


def test_no_policy_no_entries(c: Cluster) -> None:
    assert c.compiled.entries == {}
    assert c.conn("web/fe", "shop/db", 5432) is ALLOW


def test_default_deny_ingress(c: Cluster) -> None:
    c.apply(netpol("deny", "shop", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    assert c.conn("web/fe", "shop/db", 5432) is DENY
    assert c.conn("shop/api", "shop/db", 80, UDP) is DENY  # every protocol, same namespace too
    assert c.rule_of("web/fe", "shop/db", 5432) == "NetworkPolicy shop/deny default-deny"
    assert c.conn("shop/db", "web/fe", 80) is ALLOW  # the shop pods' egress is not isolated
    # The whole decision is one ANY entry per protocol and subject (plus HOST's, always allowed).
    db = c.ident("shop/db")
    mine = {k: v for k, v in c.compiled.entries.items() if k.subject == db}
    assert {(k.peer, k.port_bits, v.verdict) for k in mine for v in [mine[k]]} == {(ID_ANY, 0, DENY),
                                                                                  (ID_HOST, 0, ALLOW)}
    assert evaluate(c.compiled, db, ID_HOST, Direction.INGRESS, TCP, 10250) == (ALLOW, RULE_HOST)


def test_allow_from_namespace(c: Cluster) -> None:
    c.apply(netpol("db", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}],
                                               "ports": [{"port": 5432}]}]}))
    assert c.conn("web/fe", "shop/db", 5432) is ALLOW and c.conn("web/other", "shop/db", 5432) is ALLOW
    assert c.conn("evil/fe", "shop/db", 5432) is DENY
    assert c.conn("web/fe", "shop/db", 5433) is DENY
    assert c.rule_of("web/fe", "shop/db", 5432) == "NetworkPolicy shop/db ingress[0]"
    assert c.conn("web/fe", "shop/api", 5432) is ALLOW  # api is not selected


def test_allow_from_pod_selector(c: Cluster) -> None:
    c.apply(netpol("db", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}]}]}))
    assert c.conn("shop/api", "shop/db", 5432) is ALLOW
    assert c.conn("shop/batch", "shop/db", 5432) is DENY
    assert c.conn("web/api", "shop/db", 5432) is DENY  # same labels, other namespace


def test_both_selectors_together(c: Cluster) -> None:
    c.apply(netpol("db", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}},
                                                         "podSelector": {"matchLabels": {"app": "fe"}}}]}]}))
    assert c.conn("web/fe", "shop/db", 5432) is ALLOW
    assert c.conn("web/other", "shop/db", 5432) is DENY  # right namespace, wrong pod
    assert c.conn("evil/fe", "shop/db", 5432) is DENY  # right pod labels, wrong namespace


def test_egress_deny(c: Cluster) -> None:
    c.apply(netpol("fe-out", "web", {"podSelector": {"matchLabels": {"app": "fe"}}, "policyTypes": ["Egress"],
                                     "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "shop"}},
                                                         "podSelector": {"matchLabels": {"app": "db"}}}],
                                                 "ports": [{"port": 5432}]}]}))
    assert c.conn("web/fe", "shop/db", 5432) is ALLOW
    assert c.conn("web/fe", "shop/api", 5432) is DENY
    assert c.conn("web/fe", "shop/db", 5432, UDP) is DENY  # egress deny covers UDP (sendmsg)
    assert c.rule_of("web/fe", "shop/api", 5432) == "NetworkPolicy web/fe-out default-deny"
    assert c.egress_to("web/fe", "8.8.8.8", 53, UDP) is DENY
    assert c.conn("evil/fe", "shop/api", 5432) is ALLOW  # not selected: other namespace


def test_ip_block_with_except(c: Cluster) -> None:
    c.apply(netpol("out", "web", {"podSelector": {"matchLabels": {"app": "fe"}}, "policyTypes": ["Egress"],
                                  "egress": [{"to": [{"ipBlock": {"cidr": "192.168.0.0/16",
                                                                  "except": ["192.168.1.0/24"]}}]}]}),
            netpol("in", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}))
    assert c.egress_to("web/fe", "192.168.2.5", 443) is ALLOW
    assert c.egress_to("web/fe", "192.168.1.5", 443) is DENY
    assert c.egress_to("web/fe", "8.8.8.8", 443) is DENY
    assert c.compiled.ipcache.keys() == {"192.168.0.0/16", "192.168.1.0/24", "10.0.0.0/8"}
    assert all(CIDR_MIN <= n <= CIDR_MAX for n in c.compiled.ipcache.values())
    assert c.ingress_from("10.9.9.9", "shop/db", 5432) is ALLOW
    assert c.ingress_from("11.0.0.1", "shop/db", 5432) is DENY
    # Pod addresses are pods, not addresses: an ipBlock never matches them (Cilium's reading).
    assert c.ingress_from("10.244.0.4", "shop/db", 5432) is DENY
    # Other nodes are no CIDR either.
    db = c.ident("shop/db")
    assert evaluate(c.compiled, db, ID_REMOTE_NODE, Direction.INGRESS, TCP, 5432)[0] is DENY


def test_named_port(c: Cluster) -> None:
    c.apply(netpol("db", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"ports": [{"port": "web"}, {"port": "dns", "protocol": "UDP"}]}]}),
            netpol("fe", "web", {"podSelector": {"matchLabels": {"app": "fe"}}, "policyTypes": ["Egress"],
                                 "egress": [{"ports": [{"port": "web"}]}]}))
    assert c.conn("shop/api", "shop/db", 8080) is ALLOW  # db's container port "web"
    assert c.conn("shop/api", "shop/db", 9090) is DENY
    assert c.conn("shop/api", "shop/db", 53, UDP) is ALLOW and c.conn("shop/api", "shop/db", 53) is DENY
    # Egress: the name is resolved on the peer.
    assert c.conn("web/fe", "shop/db", 8080) is ALLOW
    assert c.conn("web/fe", "shop/api", 8080) is DENY  # api has no port named web
    assert not [p for p in c.problems if p[0] == "network_policy_port_unresolved"]


def test_port_range(c: Cluster) -> None:
    c.apply(netpol("db", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"ports": [{"port": 5000, "endPort": 5010}]}]}))
    for port, want in ((4999, DENY), (5000, ALLOW), (5005, ALLOW), (5010, ALLOW), (5011, DENY)):
        assert c.conn("shop/api", "shop/db", port) is want, port
    # 5000-5010 as prefixes: 5000/13 (5000-5007), 5008/15 (5008-5009), 5010/16.
    db = c.ident("shop/db")
    ranges = sorted(prefix_range(k.port, k.port_bits) for k in c.compiled.entries
                    if k.subject == db and k.peer == ID_ANY and c.compiled.entries[k].verdict == ALLOW)
    assert ranges == [(5000, 5007), (5008, 5009), (5010, 5010)]


def test_authorization_policy_allow_and_deny_by_principal(c: Cluster) -> None:
    c.apply(authz("allow-fe", "shop", {"selector": {"matchLabels": {"app": "db"}}, "action": "ALLOW",
                                       "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/web/sa/fe"]}}]}]}),
            authz("deny-fe", "shop", {"selector": {"matchLabels": {"app": "api"}}, "action": "DENY",
                                      "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/web/sa/fe"]}}]}]}))
    assert c.conn("web/fe", "shop/db", 5432) is ALLOW
    assert c.conn("web/other", "shop/db", 5432) is DENY
    assert c.rule_of("web/other", "shop/db", 5432) == "AuthorizationPolicy shop/allow-fe allow-policies-exist"
    assert c.conn("evil/fe", "shop/db", 5432) is DENY  # same service account name, other namespace
    assert c.conn("web/fe", "shop/db", 53, UDP) is ALLOW  # Istio's data path is TCP: UDP is NetworkPolicy's
    assert c.conn("web/fe", "shop/api", 80) is DENY
    assert c.conn("web/other", "shop/api", 80) is ALLOW


def test_authorization_policy_allow_and_deny_by_namespace(c: Cluster) -> None:
    c.apply(authz("allow-web", "shop", {"selector": {"matchLabels": {"app": "db"}},
                                        "rules": [{"from": [{"source": {"namespaces": ["web"]}}],
                                                   "to": [{"operation": {"ports": ["5432"]}}]}]}),
            authz("deny-evil", "istio-system", {"action": "DENY",  # root namespace: every workload
                                                "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]}))
    assert c.conn("web/other", "shop/db", 5432) is ALLOW
    assert c.conn("web/other", "shop/db", 5433) is DENY
    assert c.conn("shop/api", "shop/db", 5432) is DENY
    assert c.conn("evil/fe", "web/other", 80) is DENY  # mesh-wide deny
    assert c.conn("shop/api", "web/other", 80) is ALLOW


def test_not_forms(c: Cluster) -> None:
    c.apply(authz("outsiders", "shop", {"selector": {"matchLabels": {"app": "db"}}, "action": "DENY",
                                        "rules": [{"from": [{"source": {"notNamespaces": ["shop", "web"]}}]}]}),
            authz("not-fe", "web", {"selector": {"matchLabels": {"app": "other"}},
                                    "rules": [{"from": [{"source": {"notPrincipals": ["cluster.local/ns/web/sa/fe"]}}],
                                               "to": [{"operation": {"notPorts": ["22"]}}]}]}))
    assert c.conn("web/fe", "shop/db", 5432) is ALLOW and c.conn("shop/api", "shop/db", 5432) is ALLOW
    assert c.conn("evil/fe", "shop/db", 5432) is DENY
    db = c.ident("shop/db")
    for peer in (ID_WORLD, ID_REMOTE_NODE, 0xDEAD_BEEF):  # no namespace: "not in shop or web" holds
        assert evaluate(c.compiled, db, peer, Direction.INGRESS, TCP, 5432)[0] is DENY
    assert c.conn("shop/api", "web/other", 80) is ALLOW
    assert c.conn("shop/api", "web/other", 22) is DENY
    assert c.conn("web/fe", "web/other", 80) is DENY


def test_l7_field_in_deny_rule_is_enforced_without_it(c: Cluster) -> None:
    c.apply(authz("no-post", "shop", {"action": "DENY", "selector": {"matchLabels": {"app": "db"}},
                                      "rules": [{"from": [{"source": {"namespaces": ["web"]}}],
                                                 "to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}]}]}))
    assert c.conn("web/fe", "shop/db", 8080) is DENY  # every request on 8080, not only POSTs
    assert c.conn("web/fe", "shop/db", 9090) is ALLOW
    assert c.conn("shop/api", "shop/db", 8080) is ALLOW
    key = ObjectKey(Kind.AUTHORIZATION_POLICY, "shop", "no-post")
    assert [(r, k) for r, k, _ in c.problems] == [("authorization_policy_l7_in_deny", key)]


def test_l7_field_in_allow_rule_drops_the_rule(c: Cluster) -> None:
    c.apply(authz("paths", "shop", {"selector": {"matchLabels": {"app": "db"}},
                                    "rules": [{"from": [{"source": {"namespaces": ["web"]}}],
                                               "to": [{"operation": {"paths": ["/public"]}}]},
                                              {"from": [{"source": {"namespaces": ["shop"]}}]}]}))
    assert c.conn("web/fe", "shop/db", 8080) is DENY  # its only rule was dropped
    assert c.conn("shop/api", "shop/db", 8080) is ALLOW  # the L4 rule still allows
    assert [r for r, _, m in c.problems] == ["authorization_policy_l7_in_allow"]
    assert "rules[0]" in c.problems[0][2] and "AuthorizationPolicy/shop/paths" in c.problems[0][2]


def test_deny_wins(c: Cluster) -> None:
    c.apply(netpol("db", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]}]}),
            authz("allow-all", "shop", {"rules": [{}]}),
            authz("deny-fe", "shop", {"action": "DENY", "rules": [{"from": [{"source": {
                "principals": ["cluster.local/ns/web/sa/fe"]}}]}]}))
    assert c.conn("web/fe", "shop/db", 5432) is DENY  # NetworkPolicy and Istio ALLOW allow; the DENY decides
    assert c.rule_of("web/fe", "shop/db", 5432) == "AuthorizationPolicy shop/deny-fe rules[0]"
    assert c.conn("web/other", "shop/db", 5432) is ALLOW


def test_network_policy_and_authorization_policy_on_one_pod_both_must_allow(c: Cluster) -> None:
    c.apply(netpol("db", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]}]}),
            authz("db", "shop", {"selector": {"matchLabels": {"app": "db"}},
                                 "rules": [{"from": [{"source": {"principals": ["*/sa/fe", "cluster.local/ns/shop/*"]}}]}]}))
    assert c.conn("web/fe", "shop/db", 5432) is ALLOW  # both allow
    assert c.conn("web/other", "shop/db", 5432) is DENY  # NetworkPolicy allows, Istio does not
    assert c.conn("shop/api", "shop/db", 5432) is DENY  # Istio allows, NetworkPolicy does not
    assert c.conn("evil/fe", "shop/db", 5432) is DENY  # Istio allows (*/sa/fe), NetworkPolicy does not


def test_entries_only_where_a_peer_differs_from_any(c: Cluster) -> None:
    c.apply(netpol("db", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}],
                                               "ports": [{"port": 5432}]}]}))
    db = c.ident("shop/db")
    peers = {k.peer for k in c.compiled.entries if k.subject == db}
    assert peers == {ID_ANY, ID_HOST, c.ident("web/fe"), c.ident("web/other"), c.ident("web/api")}
    fe = [k for k in c.compiled.entries if k.subject == db and k.peer == c.ident("web/fe")]
    assert fe == [PolicyKey(db, c.ident("web/fe"), Direction.INGRESS, TCP, 5432, 16)]
    assert fe[0].prefixlen == 96


def test_host_network_pods_and_host_traffic() -> None:
    c = Cluster()
    c.apply(ns("shop"), pod("db", "shop", "10.244.0.1", {"app": "db"}),
            pod("node-agent", "shop", "10.0.255.1", {"app": "db"}, host_network=True),
            netpol("deny", "shop", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))
    db = c.ident("shop/db")
    assert c.compiler.subjects == {db}  # host-network pods are the node's: no subject, no peer
    for d in Direction:
        assert evaluate(c.compiled, db, ID_HOST, d, TCP, 10250)[0] is ALLOW  # kubelet probes, node Envoy
        assert evaluate(c.compiled, db, ID_WORLD, d, TCP, 443)[0] is DENY
    strict = Cluster(host_always_allowed=False)
    strict.apply(ns("shop"), pod("db", "shop", "10.244.0.1"), netpol("deny", "shop", {"podSelector": {}}))
    assert evaluate(strict.compiled, strict.ident("shop/db"), ID_HOST, Direction.INGRESS, TCP, 80)[0] is DENY


def test_subjects_are_the_nodes_pods() -> None:
    c = Cluster(node="n1")
    c.apply(ns("shop"), pod("a", "shop", "10.244.0.1", {"app": "a"}), pod("b", "shop", "10.244.1.1", {"app": "b"},
                                                                        node="n2"),
            netpol("deny", "shop", {"podSelector": {}}))
    a, b = c.ident("shop/a"), c.ident("shop/b")
    assert c.compiler.subjects == {a} and {k.subject for k in c.compiled.entries} == {a}
    c.apply(pod("b", "shop", "10.244.1.1", {"app": "b"}, node="n1"))  # rescheduled here
    assert {k.subject for k in c.compiled.entries} == {a, b}


# --- bad input ------------------------------------------------------------------------------------


def test_bad_policies_are_reported_and_open_nothing(c: Cluster) -> None:
    good = netpol("good", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}]}]})
    c.apply(good,
            # an unknown field in the spec: isolates what it selects, allows nothing
            netpol("typo", "shop", {"podSelector": {"matchLabels": {"app": "batch"}}, "ingres": [{}]}),
            # an invalid CIDR: that rule is dropped, the other rule stays
            netpol("cidr", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                    "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]},
                                                {"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}],
                                                 "ports": [{"port": 443}]}]}),
            # a port name no selected pod has: it matches no port
            netpol("named", "shop", {"podSelector": {"matchLabels": {"app": "api"}},
                                     "ingress": [{"ports": [{"port": "grpc"}]}]}),
            # only L7 fields in an ALLOW policy: the pods it selects accept nothing
            authz("l7-only", "web", {"selector": {"matchLabels": {"app": "other"}},
                                     "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}))
    assert c.conn("shop/api", "shop/db", 5432) is ALLOW  # the good policy still allows
    assert c.conn("web/fe", "shop/db", 443) is ALLOW and c.conn("web/fe", "shop/db", 80) is DENY
    assert c.ingress_from("10.1.2.3", "shop/db", 5432) is DENY  # nothing from the unreadable ipBlock
    assert c.conn("shop/api", "shop/batch", 80) is DENY
    assert c.conn("shop/db", "shop/api", 9000) is DENY
    assert c.conn("web/fe", "web/other", 80) is DENY
    reasons = {(r, k.name) for r, k, _ in c.problems}
    assert reasons == {("network_policy_invalid", "typo"), ("network_policy_rule_dropped", "cidr"),
                       ("network_policy_port_unresolved", "named"), ("authorization_policy_l7_in_allow", "l7-only")}
    assert all(f"/{k.namespace}/{k.name}" in m for _, k, m in c.problems)  # the object is named
    assert {p.reason for p in c.compiled.problems} == {r for r, _ in reasons}
    # Fixing a policy removes its problem from the compiled set; problems are heard once.
    n = len(c.problems)
    c.apply(netpol("typo", "shop", {"podSelector": {"matchLabels": {"app": "batch"}}, "ingress": [{}]}))
    assert c.conn("shop/api", "shop/batch", 80) is ALLOW
    assert "network_policy_invalid" not in {p.reason for p in c.compiled.problems} and len(c.problems) == n
    c.apply(good)
    assert len(c.problems) == n


def test_policy_types_unknown_and_audit_policies(c: Cluster) -> None:
    c.apply(netpol("types", "shop", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Sideways"],
                                     "ingress": [{}], "egress": [{}]}),
            authz("audit", "web", {"action": "AUDIT", "rules": [{}]}),
            authz("waypoint", "web", {"targetRefs": [{"kind": "Service", "name": "x"}], "action": "DENY",
                                      "rules": [{}]}))
    assert c.conn("shop/api", "shop/db", 80) is DENY and c.conn("shop/db", "shop/api", 80) is DENY
    assert c.conn("shop/api", "web/fe", 80) is ALLOW
    assert {r for r, _, _ in c.problems} == {"network_policy_invalid", "authorization_policy_not_enforced"}


def test_policy_deleted_reopens_and_removes_everything(c: Cluster) -> None:
    p = netpol("in", "shop", {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]})
    c.apply(p)
    assert c.compiled.entries and c.compiled.ipcache
    diff = c.delete(p)
    assert c.compiled.entries == {} and c.compiled.ipcache == {}
    assert all(op.value is None for op in diff.ops)
    assert dict(c.compiled.rules).keys() == {1, 2}
    assert c.conn("web/fe", "shop/db", 80) is ALLOW


def test_compiler_is_usable_without_a_state_model() -> None:
    """The compiler reads only ChangeSets: an empty one is no work."""
    comp = PolicyCompiler()
    assert comp.on_change(ChangeSet()).empty and comp.compiled().entries == {}


# --- the HBONE inbound's RBAC ---------------------------------------------------------------------


def test_inbound_rbac_by_principal_and_port(c: Cluster) -> None:
    c.apply(netpol("db", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}],
                                               "ports": [{"port": 5432}, {"port": "web"}]},
                                              {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}),
            authz("no-fe", "shop", {"action": "DENY", "rules": [{"from": [{"source": {
                "principals": ["cluster.local/ns/web/sa/fe"]}}], "to": [{"operation": {"ports": ["8080"]}}]}]}))
    rbac = inbound_rbac(c.compiler, c.ident("shop/db"))
    fe, other = "spiffe://cluster.local/ns/web/sa/fe", "spiffe://cluster.local/ns/web/sa/other"
    assert rbac.verdict(fe, 5432)[0] is ALLOW and rbac.verdict(other, 5432)[0] is ALLOW
    assert rbac.verdict(fe, 8080)[0] is DENY and rbac.verdict(other, 8080)[0] is ALLOW
    assert rbac.verdict("spiffe://cluster.local/ns/evil/sa/fe", 5432)[0] is DENY
    assert rbac.verdict("spiffe://elsewhere/ns/web/sa/x", 5432)[0] is DENY  # ipBlock 0.0.0.0/0: not for tunnels
    assert rbac.verdict(other, 22) == (DENY, c.compiled.rules[rbac.verdict(other, 22)[1]].index)
    assert c.compiled.rules[rbac.verdict(fe, 8080)[1]].ref.name == "no-fe"
    # Ranges cover the port space in order; each lists only principals that differ from its default.
    assert rbac.ranges[0].lo == 0 and rbac.ranges[-1].hi == 65535
    assert all(a.hi + 1 == b.lo for a, b in zip(rbac.ranges, rbac.ranges[1:], strict=False))
    r8080 = next(r for r in rbac.ranges if r.lo <= 8080 <= r.hi)
    assert r8080.default[0] is DENY
    assert set(r8080.principals) == {other, "spiffe://cluster.local/ns/web/sa/api", fe}  # fe: denied by another rule
    assert r8080.principals[fe][0] is DENY and r8080.principals[other][0] is ALLOW
    assert inbound_rbac(c.compiler, c.ident("web/fe")).ranges == ()  # no policy: Envoy allows all


def test_inbound_rbac_unknown_principals_take_the_safe_side(c: Cluster) -> None:
    c.apply(authz("allow", "shop", {"selector": {"matchLabels": {"app": "db"}}, "rules": [
                {"from": [{"source": {"notPrincipals": ["cluster.local/ns/evil/sa/fe"]}}]}]}),
            authz("deny", "shop", {"selector": {"matchLabels": {"app": "api"}}, "action": "DENY", "rules": [
                {"from": [{"source": {"notNamespaces": ["web"]}}]}, {"from": [{"source": {"namespaces": ["gone"]}}]}]}))
    db, api = inbound_rbac(c.compiler, c.ident("shop/db")), inbound_rbac(c.compiler, c.ident("shop/api"))
    stranger = "spiffe://other.td/ns/x/sa/y"
    assert db.verdict("spiffe://cluster.local/ns/web/sa/fe", 80)[0] is ALLOW
    assert db.verdict("spiffe://cluster.local/ns/evil/sa/fe", 80)[0] is DENY
    assert db.verdict(stranger, 80)[0] is DENY  # ALLOW by a not-form: not for a principal we cannot place
    assert api.verdict("spiffe://cluster.local/ns/web/sa/fe", 80)[0] is ALLOW
    assert api.verdict(stranger, 80)[0] is DENY  # DENY "namespaces: gone" may name it


# --- CIDR identities coming and going, written op by op -------------------------------------------


def test_a_new_cidr_inside_an_allowed_one_never_blinks() -> None:
    """A policy elsewhere names 10.1.0.0/16 inside the 10.0.0.0/8 db allows: 10.1.2.3 gets its own
    identity, which must be allowed before the ipcache resolves the address to it."""
    c = Cluster(check_writes=True)
    c.apply(ns("shop"), pod("db", "shop", "10.244.0.1", {"app": "db"}), pod("api", "shop", "10.244.0.2", {"app": "api"}),
            netpol("db", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 443}]}]}))
    assert c.ingress_from("10.1.2.3", "shop/db", 443) is ALLOW
    diff = c.apply(netpol("api", "shop", {"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Egress"],
                                          "egress": [{"to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}]}]}))
    assert c.ingress_from("10.1.2.3", "shop/db", 443) is ALLOW
    n = c.compiled.ipcache["10.1.0.0/16"]
    first_ipcache = next(i for i, op in enumerate(diff.ops) if op.map == "ipcache")
    assert all(op.key.peer == n and op.value is not None for op in diff.ops[:first_ipcache])  # type: ignore[union-attr]


def test_a_cidr_that_goes_leaves_through_a_ghost() -> None:
    """10.1.0.0/16 had its own, wider allowance; when no policy names it any more its addresses fall
    back to 10.0.0.0/8, and 443 (allowed before and after) is never denied on the way."""
    c = Cluster(check_writes=True)
    narrow = {"from": [{"ipBlock": {"cidr": "10.1.0.0/16"}}], "ports": [{"port": 80}]}
    wide = {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 443}]}
    c.apply(ns("shop"), pod("db", "shop", "10.244.0.1", {"app": "db"}),
            netpol("db", "shop", {"podSelector": {}, "ingress": [narrow, wide]}))
    assert c.ingress_from("10.1.2.3", "shop/db", 80) is ALLOW and c.ingress_from("10.1.2.3", "shop/db", 443) is ALLOW
    n = c.compiled.ipcache["10.1.0.0/16"]
    diff = c.apply(netpol("db", "shop", {"podSelector": {}, "ingress": [wide]}))
    assert c.ingress_from("10.1.2.3", "shop/db", 80) is DENY and c.ingress_from("10.1.2.3", "shop/db", 443) is ALLOW
    removal = next(i for i, op in enumerate(diff.ops) if op.map == "ipcache")
    assert diff.ops[removal].value is None
    assert all(op.key.peer == n and op.value is None for op in diff.ops[removal + 1:])  # type: ignore[union-attr]
    assert all(k.peer != n for k in c.compiled.entries)


def test_named_ports_follow_the_pods_of_an_identity(c: Cluster) -> None:
    """Replicas of one identity may name different ports: each name is resolved on all of them."""
    c.apply(netpol("db", "shop", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"ports": [{"port": "web"}]}]}),
            netpol("fe", "web", {"podSelector": {"matchLabels": {"app": "fe"}}, "policyTypes": ["Egress"],
                                 "egress": [{"ports": [{"port": "web"}]}]}))
    assert c.conn("shop/api", "shop/db", 8080) is ALLOW and c.conn("shop/api", "shop/db", 8443) is DENY
    db2 = pod("db2", "shop", "10.244.0.9", {"app": "db"}, sa="db", ports=[("web", 8443, "TCP")])
    c.apply(db2)  # same identity as db (namespace, service account, labels), "web" is 8443 here
    assert c.ident("shop/db2") == c.ident("shop/db")
    assert c.conn("shop/api", "shop/db", 8443) is ALLOW and c.conn("web/fe", "shop/db", 8443) is ALLOW
    c.delete(db2)
    assert c.conn("shop/api", "shop/db", 8443) is DENY and c.conn("web/fe", "shop/db", 8443) is DENY
    assert c.conn("shop/api", "shop/db", 8080) is ALLOW and c.conn("web/fe", "shop/db", 8080) is ALLOW


@pytest.mark.parametrize(("pattern", "namespace"), [
    ("cluster.local/ns/a/sa/b", "a"), ("*/ns/a/sa/b", "a"), ("cluster.local/ns/a/*", "a"),
    ("cluster.local/ns/a/sa/b*", "a"), ("*", None), ("cluster.local/ns/a*", None), ("*a/sa/b", None),
    ("cluster.local/*/sa/b", None), ("cluster.local/ns/a", None),
])
def test_a_principal_pattern_pins_its_namespace_only_when_it_must(pattern: str, namespace: str | None) -> None:
    assert principal_namespace(pattern) == namespace


def test_principal_and_namespace_members_are_looked_up_by_namespace_and_equal_a_full_scan() -> None:
    td = "cluster.local"
    index = PeerIndex(td)
    for i, (namespace, sa) in enumerate((n, s) for n in ("a", "ab", "b", "c") for s in ("x", "y", "xy")):
        index.set_facts(100 + i, PeerFacts(100 + i, PeerKind.POD, namespace=namespace, service_account=sa))
    matchers = [Principals(("cluster.local/ns/a/sa/x",)), Principals(("*/ns/a/sa/x", "cluster.local/ns/b/*")),
                Principals(("cluster.local/ns/a*",)), Principals(("*x",)), Principals(("*",)),
                Namespaces(("a", "c")), Namespaces(("a*",)), Namespaces(("*",))]
    for m in matchers:
        index.hold(m)
        assert index.members(m) == {i for i, f in index.facts.items() if m.matches(f, td)}, m
    assert Principals(("*/ns/a/sa/x", "cluster.local/ns/b/*")).namespaces() == ("a", "b")
    assert Principals(("cluster.local/ns/a/sa/x", "*x")).namespaces() is None  # one open pattern: everyone
    assert Namespaces(("c", "a")).namespaces() == ("a", "c") and Namespaces(("a*",)).namespaces() is None
    # A pod identity that arrives later joins the matchers it matches, and only those.
    index.set_facts(200, PeerFacts(200, PeerKind.POD, namespace="a", service_account="x"))
    assert all((200 in index.members(m)) == m.matches(index.facts[200], td) for m in matchers)
