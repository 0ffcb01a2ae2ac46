"""A direct reading of the policies, for checking the compiler: given the records, one subject pod
identity, one peer, a direction, a protocol and a port, is the connection allowed?

Written from the rules of POLICY.md and the Kubernetes / Istio documents, with no sets, intervals or
entries: the compiler's output must agree with it everywhere. Peers are described by what the kernel
knows of them: a pod identity (the union of its pods' facts), an address that is no pod's (matched
against CIDRs as such), this node (HOST) or another node (REMOTE_NODE).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from accel.state.model import (
    AuthorizationPolicy,
    AuthzRule,
    AuthzSource,
    NetworkPolicy,
    NetworkPolicyPeer,
    NetworkPolicyRule,
)
from accel.state.parse import WHEN_L4_KEYS

TCP, UDP, SCTP = 6, 17, 132
PROTO = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}


@dataclass(frozen=True)
class RefPod:
    """A pod identity: namespace, service account, labels and its namespace's labels; named ports
    (name, protocol, number) and IPs of all its pods."""

    namespace: str
    service_account: str
    labels: Mapping[str, str]
    ns_labels: Mapping[str, str]
    named_ports: frozenset[tuple[str, str, int]] = frozenset()
    ips: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RefPeer:
    kind: str  # "pod" | "address" | "host" | "remote-node" | "any"
    pod: RefPod | None = None
    address: str = ""


@dataclass
class RefPolicies:
    network: list[NetworkPolicy] = field(default_factory=list)
    authz: list[AuthorizationPolicy] = field(default_factory=list)
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"


def _inside(address: str, cidrs: Iterable[str]) -> bool:
    a = ipaddress.ip_address(address)
    return any(a.version == (n := ipaddress.ip_network(c)).version and a in n for c in cidrs)


def _resolve(pod: RefPod | None, name: str, proto: int) -> set[int]:
    if pod is None:
        return set()
    return {n for nm, p, n in pod.named_ports if nm == name and PROTO[p] == proto}


# --- NetworkPolicy --------------------------------------------------------------------------------


def _np_peer_matches(np: NetworkPolicy, p: NetworkPolicyPeer, peer: RefPeer) -> bool:
    if p.ip_block is not None:
        # Only addresses that are no pod's: pods and nodes are never matched by an ipBlock.
        return peer.kind == "address" and _inside(peer.address, [p.ip_block.cidr]) \
            and not _inside(peer.address, p.ip_block.except_)
    if peer.kind != "pod" or peer.pod is None:
        return False
    pod = peer.pod
    if p.namespace_selector is None:
        if pod.namespace != np.namespace:
            return False
    elif not p.namespace_selector.matches(pod.ns_labels):
        return False
    return p.pod_selector is None or p.pod_selector.matches(pod.labels)


def _np_rule_matches(np: NetworkPolicy, rule: NetworkPolicyRule, subject: RefPod, peer: RefPeer, ingress: bool,
                     proto: int, port: int) -> bool:
    if rule.peers and not any(_np_peer_matches(np, p, peer) for p in rule.peers):
        return False
    if not rule.ports:
        return True
    for p in rule.ports:
        if PROTO[p.protocol] != proto:
            continue
        if p.port is None:
            return True
        if isinstance(p.port, str):
            if port in _resolve(subject if ingress else peer.pod, p.port, proto):
                return True
        elif p.port <= port <= (p.end_port or p.port):
            return True
    return False


def network_policy_allows(pols: RefPolicies, subject: RefPod, peer: RefPeer, ingress: bool, proto: int,
                          port: int) -> bool:
    direction = "Ingress" if ingress else "Egress"
    isolating = [np for np in pols.network if np.namespace == subject.namespace
                 and np.pod_selector.matches(subject.labels) and direction in np.policy_types]
    if not isolating:
        return True
    for np in isolating:
        if np.problems:
            continue  # an unreadable policy allows nothing
        for rule in np.ingress if ingress else np.egress:
            if not rule.problems and _np_rule_matches(np, rule, subject, peer, ingress, proto, port):
                return True
    return False


# --- AuthorizationPolicy --------------------------------------------------------------------------


def _istio_str(pattern: str, value: str) -> bool:
    if not value:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return pattern == value


def _principal(pols: RefPolicies, peer: RefPeer) -> str:
    if peer.kind != "pod" or peer.pod is None:
        return ""
    return f"{pols.trust_domain}/ns/{peer.pod.namespace}/sa/{peer.pod.service_account}"


def _in_blocks(peer: RefPeer, cidrs: Iterable[str]) -> bool:
    cidrs = list(cidrs)
    if peer.kind == "address":
        return _inside(peer.address, cidrs)
    if peer.kind == "pod" and peer.pod is not None and peer.pod.ips:
        return all(_inside(ip, cidrs) for ip in peer.pod.ips)
    return False


def _namespace(peer: RefPeer) -> str:
    return peer.pod.namespace if peer.kind == "pod" and peer.pod is not None else ""


def _authz_rule_matches(pols: RefPolicies, rule: AuthzRule, peer: RefPeer, port: int) -> bool:
    principal, ns = _principal(pols, peer), _namespace(peer)

    def any_of(patterns: Iterable[str], value: str) -> bool:
        return any(_istio_str(p, value) for p in patterns)

    if rule.sources:
        def source_ok(s: AuthzSource) -> bool:
            checks = [
                not s.principals or any_of(s.principals, principal),
                not s.not_principals or not any_of(s.not_principals, principal),
                not s.namespaces or any_of(s.namespaces, ns),
                not s.not_namespaces or not any_of(s.not_namespaces, ns),
                not s.ip_blocks or _in_blocks(peer, s.ip_blocks),
                not s.not_ip_blocks or not _in_blocks(peer, s.not_ip_blocks),
            ]
            return all(checks)  # request principals and remote IPs are L7: left out (DENY only reaches here)

        if not any(source_ok(s) for s in rule.sources):
            return False
    if rule.operations and not any((not o.ports or str(port) in o.ports) and str(port) not in o.not_ports
                                   for o in rule.operations):
        return False
    for c in rule.when:
        value_of = {"source.principal": principal, "source.namespace": ns}
        if c.key in value_of:
            v = value_of[c.key]
            if c.values and not any_of(c.values, v):
                return False
            if c.not_values and any_of(c.not_values, v):
                return False
        elif c.key == "source.ip":
            if c.values and not _in_blocks(peer, c.values):
                return False
            if c.not_values and _in_blocks(peer, c.not_values):
                return False
        elif c.key == "destination.port":
            if c.values and str(port) not in c.values:
                return False
            if str(port) in c.not_values:
                return False
    return True


def _has_l7(rule: AuthzRule) -> bool:
    return any(s.has_l7 for s in rule.sources) or any(o.has_l7 for o in rule.operations) \
        or any(c.key not in WHEN_L4_KEYS for c in rule.when)


def _applies(pols: RefPolicies, ap: AuthorizationPolicy, subject: RefPod) -> bool:
    if ap.target_refs or ap.action not in ("ALLOW", "DENY"):
        return False
    if ap.namespace != pols.root_namespace and ap.namespace != subject.namespace:
        return False
    return ap.selector is None or ap.selector.matches(subject.labels)


def istio_verdict(pols: RefPolicies, subject: RefPod, peer: RefPeer, port: int) -> bool | None:
    """True/False when Istio decides a TCP connection to the subject, None when no policy applies."""
    applying = [ap for ap in pols.authz if _applies(pols, ap, subject)]
    for ap in applying:
        if ap.action == "DENY" and any(_authz_rule_matches(pols, r, peer, port) for r in ap.rules):
            return False
    allows = [ap for ap in applying if ap.action == "ALLOW"]
    if not allows:
        return None
    for ap in allows:
        if ap.problems:
            continue
        for r in ap.rules:
            if r.problems or _has_l7(r):
                continue
            if _authz_rule_matches(pols, r, peer, port):
                return True
    return False


def allowed(pols: RefPolicies, subject: RefPod, peer: RefPeer, ingress: bool, proto: int, port: int,
            *, host_always_allowed: bool = True) -> bool:
    if peer.kind == "host" and host_always_allowed:
        return True
    if ingress and proto == TCP and istio_verdict(pols, subject, peer, port) is False:
        return False
    return network_policy_allows(pols, subject, peer, ingress, proto, port)
