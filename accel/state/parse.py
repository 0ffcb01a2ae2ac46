"""Kubernetes objects (plain dicts from JSON or YAML) to model records. The only place that reads
raw objects; every problem is a ParseError naming the object and what was wrong."""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from accel.state.model import (
    ANNOTATION_PREFIX,
    ISTIO_SIDECAR_STATUS,
    AuthorizationPolicy,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    BackendRef,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    HeaderMatch,
    HTTPRoute,
    HTTPRouteMatch,
    HTTPRouteRetry,
    HTTPRouteRule,
    IPBlock,
    Kind,
    LabelSelector,
    LabelSelectorRequirement,
    Namespace,
    NetworkPolicy,
    NetworkPolicyPeer,
    NetworkPolicyPort,
    NetworkPolicyRule,
    ParentRef,
    PathMatch,
    PeerAuthentication,
    Pod,
    Record,
    Service,
    ServicePort,
    TargetRef,
    frozen_map,
)

# Annotations the model keeps; everything else is dropped at the edge to keep memory small.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True, slots=True)
class ApiKind:
    """Where the API serves one kind we read. The kube source, the manifest folder and the test API
    server all take this one table."""

    kind: Kind
    group_version: str  # "v1" for the core group
    plural: str
    namespaced: bool
    crd: bool  # installed by Istio or Gateway API: read only when the API server has it

    @property
    def group(self) -> str:
        return self.group_version.rpartition("/")[0]

    @property
    def path(self) -> str:
        base = "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"
        return f"{base}/{self.plural}"


API_KINDS: dict[Kind, ApiKind] = {a.kind: a for a in (
    ApiKind(Kind.NAMESPACE, "v1", "namespaces", False, False),
    ApiKind(Kind.POD, "v1", "pods", True, False),
    ApiKind(Kind.SERVICE, "v1", "services", True, False),
    ApiKind(Kind.ENDPOINT_SLICE, "discovery.k8s.io/v1", "endpointslices", True, False),
    ApiKind(Kind.NETWORK_POLICY, "networking.k8s.io/v1", "networkpolicies", True, False),
    ApiKind(Kind.AUTHORIZATION_POLICY, "security.istio.io/v1", "authorizationpolicies", True, True),
    ApiKind(Kind.PEER_AUTHENTICATION, "security.istio.io/v1", "peerauthentications", True, True),
    ApiKind(Kind.HTTP_ROUTE, "gateway.networking.k8s.io/v1", "httproutes", True, True),
)}
CLUSTER_SCOPED = frozenset(k for k, a in API_KINDS.items() if not a.namespaced)


class ParseError(ValueError):
    """An object we cannot turn into a record; str() is one line naming the object and the reason."""


class NotOurKind(ValueError):
    """A well-formed Kubernetes object of a kind the model does not keep (e.g. a Deployment)."""


def _meta(obj: Mapping[str, Any], kind: Kind) -> tuple[str, str, Mapping[str, Any]]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise ParseError(f"{kind}: metadata missing or not a mapping")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ParseError(f"{kind}: metadata.name missing")
    ns = meta.get("namespace") or ""
    if not isinstance(ns, str):
        raise ParseError(f"{kind} {name}: metadata.namespace is not a string")
    if kind not in CLUSTER_SCOPED and not ns:
        ns = "default"
    return name, ns, meta


_intern = sys.intern
_MAPS: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}


def _shared_map(d: dict[str, str]) -> Mapping[str, str]:
    """One read-only map per distinct content: pods of one workload share their labels."""
    if not d:
        return frozen_map(None)
    key = tuple(sorted(d.items()))
    m = _MAPS.get(key)
    if m is None:
        if len(_MAPS) > 200_000:  # bounded: a cache, not a leak
            _MAPS.clear()
        m = _MAPS[key] = frozen_map({_intern(k): v for k, v in d.items()})
    return m


def _strmap(v: Any, what: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ParseError(f"{what} is not a mapping")
    return {str(k): "" if x is None else str(x) for k, x in v.items()}


def _interesting(annotations: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in annotations.items() if k.startswith(ANNOTATION_PREFIX) or k == ISTIO_SIDECAR_STATUS}


def _list(v: Any, what: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ParseError(f"{what} is not a list")
    return v


def _strs(v: Any, what: str) -> tuple[str, ...]:
    return tuple(str(x) for x in _list(v, what))


def _int(v: Any, what: str, *, lo: int = 0, hi: int = 65535) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ParseError(f"{what}={v!r} is not an integer in [{lo}, {hi}]")
    return v


def _int_or_name(v: Any, what: str) -> int | str:
    if isinstance(v, str):
        if v.isdigit():
            return _int(int(v), what, lo=1)
        if not v:
            raise ParseError(f"{what} is empty")
        return v
    return _int(v, what, lo=1)


def canonical_ip(text: Any, what: str) -> str:
    s = str(text)
    # Fast path: a dotted quad that round-trips through inet_pton/inet_ntop is already canonical.
    # ipaddress costs ~5 us a call, and a cluster sync parses one IP per pod and per endpoint.
    try:
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, s)) == s:
            return s
    except OSError:
        pass
    try:
        return ipaddress.ip_address(s).compressed
    except ValueError:
        raise ParseError(f"{what}={text!r} is not an IP address") from None


def _rv(meta: Mapping[str, Any]) -> str:
    return str(meta.get("resourceVersion") or "")


_PORTS: dict[tuple[ContainerPort, ...], tuple[ContainerPort, ...]] = {}


def _named_ports(spec: Mapping[str, Any]) -> tuple[ContainerPort, ...]:
    """The named ports of the pod's containers (what NetworkPolicy port names resolve to). Lenient:
    a malformed entry is skipped, never a reason to lose the pod."""
    out: list[ContainerPort] = []
    containers = spec.get("containers")
    for c in containers if isinstance(containers, list) else ():
        ports = c.get("ports") if isinstance(c, Mapping) else None
        for p in ports if isinstance(ports, list) else ():
            if not isinstance(p, Mapping):
                continue
            name, number = p.get("name"), p.get("containerPort")
            if isinstance(name, str) and name and isinstance(number, int) and not isinstance(number, bool) \
                    and 0 < number < 65536:
                out.append(ContainerPort(_intern(name), _intern(str(p.get("protocol") or "TCP")), number))
    if not out:
        return ()
    key = tuple(out)
    shared = _PORTS.get(key)
    if shared is None:  # replicas share one tuple
        if len(_PORTS) > 50_000:
            _PORTS.clear()
        shared = _PORTS[key] = key
    return shared


def parse_pod(obj: Mapping[str, Any]) -> Pod:
    name, ns, meta = _meta(obj, Kind.POD)
    where = f"Pod {ns}/{name}"
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if not isinstance(spec, Mapping) or not isinstance(status, Mapping):
        raise ParseError(f"{where}: spec/status is not a mapping")
    ips: list[str] = []
    for entry in _list(status.get("podIPs"), f"{where}: status.podIPs"):
        ip = entry.get("ip") if isinstance(entry, Mapping) else None
        if ip:
            ips.append(canonical_ip(ip, f"{where}: status.podIPs"))
    if not ips and status.get("podIP"):
        ips.append(canonical_ip(status["podIP"], f"{where}: status.podIP"))
    ready = False
    for cond in _list(status.get("conditions"), f"{where}: status.conditions"):
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            ready = cond.get("status") == "True"
    # Namespaces, nodes, service accounts and label sets repeat across thousands of pods: share them.
    return Pod(
        name=name,
        namespace=_intern(ns),
        uid=str(meta.get("uid") or ""),
        node=_intern(str(spec.get("nodeName") or "")),
        ips=tuple(dict.fromkeys(ips)),
        labels=_shared_map(_strmap(meta.get("labels"), f"{where}: labels")),
        service_account=_intern(str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")),
        annotations=_shared_map(_interesting(_strmap(meta.get("annotations"), f"{where}: annotations"))),
        phase=_intern(str(status.get("phase") or "Pending")),
        ready=ready,
        host_network=bool(spec.get("hostNetwork", False)),
        resource_version=_rv(meta),
        named_ports=_named_ports(spec),
    )


def parse_namespace(obj: Mapping[str, Any]) -> Namespace:
    name, _, meta = _meta(obj, Kind.NAMESPACE)
    return Namespace(
        name=name,
        uid=str(meta.get("uid") or ""),
        labels=frozen_map(_strmap(meta.get("labels"), f"Namespace {name}: labels")),
        annotations=frozen_map(_interesting(_strmap(meta.get("annotations"), f"Namespace {name}: annotations"))),
        resource_version=_rv(meta),
    )


def parse_service(obj: Mapping[str, Any]) -> Service:
    name, ns, meta = _meta(obj, Kind.SERVICE)
    where = f"Service {ns}/{name}"
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ParseError(f"{where}: spec is not a mapping")
    ips = _strs(spec.get("clusterIPs"), f"{where}: spec.clusterIPs") or (
        (str(spec["clusterIP"]),) if spec.get("clusterIP") else ()
    )
    cluster_ips = tuple(canonical_ip(ip, f"{where}: spec.clusterIPs") for ip in ips if ip not in ("None", ""))
    ports = []
    for i, p in enumerate(_list(spec.get("ports"), f"{where}: spec.ports")):
        if not isinstance(p, Mapping):
            raise ParseError(f"{where}: spec.ports[{i}] is not a mapping")
        port = _int(p.get("port"), f"{where}: spec.ports[{i}].port", lo=1)
        ports.append(
            ServicePort(
                name=str(p.get("name") or ""),
                protocol=str(p.get("protocol") or "TCP"),
                port=port,
                target_port=_int_or_name(p.get("targetPort", port), f"{where}: spec.ports[{i}].targetPort"),
                app_protocol=str(p.get("appProtocol") or ""),
            )
        )
    selector = spec.get("selector")
    timeout: int | None = None
    affinity = str(spec.get("sessionAffinity") or "None")
    if affinity == "ClientIP":
        cfg = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
        timeout = _int(cfg.get("timeoutSeconds", 10800), f"{where}: sessionAffinityConfig.clientIP.timeoutSeconds",
                       lo=1, hi=86400)
    return Service(
        name=name,
        namespace=ns,
        uid=str(meta.get("uid") or ""),
        type=str(spec.get("type") or "ClusterIP"),
        cluster_ips=cluster_ips,
        ports=tuple(ports),
        selector=frozen_map(_strmap(selector, f"{where}: spec.selector")) if selector else None,
        session_affinity=affinity,
        session_affinity_timeout=timeout,
        internal_traffic_policy=str(spec.get("internalTrafficPolicy") or "Cluster"),
        labels=frozen_map(_strmap(meta.get("labels"), f"{where}: labels")),
        annotations=frozen_map(_interesting(_strmap(meta.get("annotations"), f"{where}: annotations"))),
        resource_version=_rv(meta),
    )


def parse_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSlice:
    name, ns, meta = _meta(obj, Kind.ENDPOINT_SLICE)
    where = f"EndpointSlice {ns}/{name}"
    labels = _strmap(meta.get("labels"), f"{where}: labels")
    address_type = str(obj.get("addressType") or "IPv4")
    endpoints = []
    for i, e in enumerate(_list(obj.get("endpoints"), f"{where}: endpoints")):
        if not isinstance(e, Mapping):
            raise ParseError(f"{where}: endpoints[{i}] is not a mapping")
        addrs = _strs(e.get("addresses"), f"{where}: endpoints[{i}].addresses")
        if address_type in ("IPv4", "IPv6"):
            addrs = tuple(canonical_ip(a, f"{where}: endpoints[{i}].addresses") for a in addrs)
        cond = e.get("conditions") or {}
        ready = cond.get("ready") is not False  # unset means ready
        ref = e.get("targetRef")
        endpoints.append(
            Endpoint(
                addresses=addrs,
                ready=ready,
                serving=cond.get("serving", ready) is not False,
                terminating=cond.get("terminating") is True,
                node_name=str(e.get("nodeName") or ""),
                target_ref=TargetRef(
                    kind=str(ref.get("kind") or ""),
                    namespace=str(ref.get("namespace") or ns),
                    name=str(ref.get("name") or ""),
                    uid=str(ref.get("uid") or ""),
                )
                if isinstance(ref, Mapping)
                else None,
                zone=str(e.get("zone") or ""),
                hostname=str(e.get("hostname") or ""),
            )
        )
    ports = []
    for i, p in enumerate(_list(obj.get("ports"), f"{where}: ports")):
        if not isinstance(p, Mapping):
            raise ParseError(f"{where}: ports[{i}] is not a mapping")
        port = p.get("port")
        ports.append(
            EndpointPort(
                name=str(p.get("name") or ""),
                protocol=str(p.get("protocol") or "TCP"),
                port=None if port is None else _int(port, f"{where}: ports[{i}].port", lo=1),
                app_protocol=str(p.get("appProtocol") or ""),
            )
        )
    return EndpointSlice(
        name=name,
        namespace=ns,
        service_name=labels.get(SERVICE_NAME_LABEL, ""),
        address_type=address_type,
        endpoints=tuple(endpoints),
        ports=tuple(ports),
        resource_version=_rv(meta),
    )


_SELECTOR_FIELDS = frozenset({"matchLabels", "matchExpressions"})
_EXPRESSION_FIELDS = frozenset({"key", "operator", "values"})


def _unknown_fields(v: Mapping[str, Any], known: frozenset[str], what: str) -> list[str]:
    return [f"{what}: unknown field {str(k)!r}" for k in v if k not in known]


def parse_label_selector(v: Any, what: str, *, strict: bool = False, match_labels_only: bool = False) -> LabelSelector:
    """A label selector; `strict` also rejects unknown fields and malformed expressions (policies:
    a selector we misread would select the wrong pods)."""
    if v is None:
        return LabelSelector()
    if not isinstance(v, Mapping):
        raise ParseError(f"{what} is not a mapping")
    if strict:
        known = frozenset({"matchLabels"}) if match_labels_only else _SELECTOR_FIELDS
        bad = _unknown_fields(v, known, what)
        if bad:
            raise ParseError(bad[0] + (" (Istio selectors take matchLabels only)" if match_labels_only else ""))
    exprs = []
    for i, r in enumerate(_list(v.get("matchExpressions"), f"{what}.matchExpressions")):
        w = f"{what}.matchExpressions[{i}]"
        if not isinstance(r, Mapping) or r.get("operator") not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ParseError(f"{w} has no valid operator (In, NotIn, Exists, DoesNotExist)")
        values = _strs(r.get("values"), f"{w}.values")
        if strict:
            bad = _unknown_fields(r, _EXPRESSION_FIELDS, w)
            if bad:
                raise ParseError(bad[0])
            if not isinstance(r.get("key"), str) or not r.get("key"):
                raise ParseError(f"{w}.key is missing")
            if (r["operator"] in ("In", "NotIn")) != bool(values):
                raise ParseError(f"{w}: operator {r['operator']} "
                                 + ("needs values" if r["operator"] in ("In", "NotIn") else "takes no values"))
        exprs.append(LabelSelectorRequirement(str(r.get("key") or ""), str(r["operator"]), values))
    return LabelSelector(frozen_map(_strmap(v.get("matchLabels"), f"{what}.matchLabels")), tuple(exprs))


def canonical_cidr(text: Any, what: str, *, bare_ip: bool = False) -> str:
    """A CIDR in canonical text (host bits cleared, as the API server's sloppy parse reads it); with
    `bare_ip` an address alone is its /32 (/128), as Istio's ipBlocks allow."""
    s = str(text).strip()
    if bare_ip and "/" not in s:
        try:
            a = ipaddress.ip_address(s)
            return f"{a.compressed}/{a.max_prefixlen}"
        except ValueError:
            raise ParseError(f"{what}={text!r} is not an IP address or CIDR") from None
    try:
        return ipaddress.ip_network(s, strict=False).compressed
    except ValueError:
        raise ParseError(f"{what}={text!r} is not a CIDR like 10.0.0.0/8") from None


_PROTOCOLS = ("TCP", "UDP", "SCTP")
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")  # IANA_SVC_NAME


def _np_peer(p: Any, what: str) -> NetworkPolicyPeer:
    if not isinstance(p, Mapping):
        raise ParseError(f"{what} is not a mapping")
    bad = _unknown_fields(p, frozenset({"podSelector", "namespaceSelector", "ipBlock"}), what)
    if bad:
        raise ParseError(bad[0])
    if not p:
        raise ParseError(f"{what} sets none of podSelector, namespaceSelector, ipBlock")
    block = p.get("ipBlock")
    ip_block = None
    if "ipBlock" in p:
        if "podSelector" in p or "namespaceSelector" in p:
            raise ParseError(f"{what}: ipBlock cannot be combined with podSelector or namespaceSelector")
        if not isinstance(block, Mapping):
            raise ParseError(f"{what}.ipBlock is not a mapping")
        bad = _unknown_fields(block, frozenset({"cidr", "except"}), f"{what}.ipBlock")
        if bad:
            raise ParseError(bad[0])
        cidr = canonical_cidr(block.get("cidr"), f"{what}.ipBlock.cidr")
        net = ipaddress.ip_network(cidr)
        excepts = []
        for j, e in enumerate(_list(block.get("except"), f"{what}.ipBlock.except")):
            ex = canonical_cidr(e, f"{what}.ipBlock.except[{j}]")
            en = ipaddress.ip_network(ex)
            if en.version != net.version or not en.subnet_of(net) or en == net:  # type: ignore[arg-type]
                raise ParseError(f"{what}.ipBlock.except[{j}]={e!r} is not a strict subset of cidr {cidr}")
            excepts.append(ex)
        ip_block = IPBlock(cidr, tuple(excepts))
    return NetworkPolicyPeer(
        pod_selector=parse_label_selector(p["podSelector"], f"{what}.podSelector", strict=True)
        if "podSelector" in p else None,
        namespace_selector=parse_label_selector(p["namespaceSelector"], f"{what}.namespaceSelector", strict=True)
        if "namespaceSelector" in p else None,
        ip_block=ip_block,
    )


def _np_port(p: Any, what: str) -> NetworkPolicyPort:
    if not isinstance(p, Mapping):
        raise ParseError(f"{what} is not a mapping")
    bad = _unknown_fields(p, frozenset({"protocol", "port", "endPort"}), what)
    if bad:
        raise ParseError(bad[0])
    proto = str(p.get("protocol") or "TCP")
    if proto not in _PROTOCOLS:
        raise ParseError(f"{what}.protocol={proto!r} is not TCP, UDP or SCTP")
    port = p.get("port")
    number: int | str | None = None
    if port is not None:
        number = _int_or_name(port, f"{what}.port")
        if isinstance(number, str) and not _PORT_NAME.match(number):
            raise ParseError(f"{what}.port={port!r} is neither a port number nor a valid port name")
    end = p.get("endPort")
    if end is not None:
        end = _int(end, f"{what}.endPort", lo=1)
        if not isinstance(number, int) or end < number:
            raise ParseError(f"{what}.endPort={end} needs a numeric port <= endPort")
    return NetworkPolicyPort(protocol=proto, port=number, end_port=end)


def _np_rule(r: Any, peers_field: str, what: str) -> NetworkPolicyRule:
    """One ingress/egress rule. Anything unreadable inside it goes to `problems` (the rule then allows
    nothing): an unknown field may be a typo of `from`, and reading it as "all peers" would open up."""
    if not isinstance(r, Mapping):
        return NetworkPolicyRule((), (), (f"{what} is not a mapping",))
    problems = _unknown_fields(r, frozenset({peers_field, "ports"}), what)
    peers, ports = [], []
    try:
        items = _list(r.get(peers_field), f"{what}.{peers_field}")
    except ParseError as e:
        items, problems = [], [*problems, str(e)]
    for i, p in enumerate(items):
        try:
            peers.append(_np_peer(p, f"{what}.{peers_field}[{i}]"))
        except ParseError as e:
            problems.append(str(e))
    try:
        items = _list(r.get("ports"), f"{what}.ports")
    except ParseError as e:
        items, problems = [], [*problems, str(e)]
    for i, p in enumerate(items):
        try:
            ports.append(_np_port(p, f"{what}.ports[{i}]"))
        except ParseError as e:
            problems.append(str(e))
    return NetworkPolicyRule(tuple(peers), tuple(ports), tuple(problems))


_NP_SPEC_FIELDS = frozenset({"podSelector", "policyTypes", "ingress", "egress"})


def parse_network_policy(obj: Mapping[str, Any]) -> NetworkPolicy:
    """Never fails once the object has a name: what cannot be read becomes a problem on the record,
    and the compiler reads a problem as "isolate, allow nothing" (accel/policy)."""
    name, ns, meta = _meta(obj, Kind.NETWORK_POLICY)
    where = f"NetworkPolicy {ns}/{name}"
    spec = obj.get("spec") or {}
    problems: list[str] = []
    if not isinstance(spec, Mapping):
        problems.append(f"{where}: spec is not a mapping")
        spec = {}
    problems += _unknown_fields(spec, _NP_SPEC_FIELDS, f"{where}: spec")
    try:
        selector = parse_label_selector(spec.get("podSelector"), f"{where}: spec.podSelector", strict=True)
    except ParseError as e:
        problems.append(f"{e}; the policy applies to the whole namespace")
        selector = LabelSelector()

    def rules(field_name: str, peers_field: str) -> tuple[NetworkPolicyRule, ...]:
        try:
            items = _list(spec.get(field_name), f"{where}: spec.{field_name}")
        except ParseError as e:
            problems.append(str(e))
            return (NetworkPolicyRule((), (), (str(e),)),)
        return tuple(_np_rule(r, peers_field, f"{where}: spec.{field_name}[{i}]") for i, r in enumerate(items))

    ingress = rules("ingress", "from")
    egress = rules("egress", "to")
    try:
        given = _strs(spec.get("policyTypes"), f"{where}: spec.policyTypes")
    except ParseError as e:
        problems.append(str(e))
        given = ("Ingress", "Egress")
    bad_types = [t for t in given if t not in ("Ingress", "Egress")]
    if bad_types:
        problems.append(f"{where}: spec.policyTypes has {bad_types[0]!r} (Ingress or Egress); "
                        "both directions are isolated")
        types: tuple[str, ...] = ("Ingress", "Egress")
    else:
        # The API's defaulting: Ingress always, Egress when there are egress rules.
        types = tuple(dict.fromkeys(given)) or (("Ingress", "Egress") if spec.get("egress") else ("Ingress",))
    return NetworkPolicy(
        name=name,
        namespace=ns,
        pod_selector=selector,
        policy_types=types,
        ingress=ingress,
        egress=egress,
        resource_version=_rv(meta),
        problems=tuple(problems),
        uid=str(meta.get("uid") or ""),
    )


# Istio's field names (camelCase) for the records' fields, and which are read as what.
def _camel(f: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), f)


_SOURCE_FIELDS = {_camel(f): f for f in AuthzSource.__dataclass_fields__}
_OPERATION_FIELDS = {_camel(f): f for f in AuthzOperation.__dataclass_fields__}
_CIDR_FIELDS = frozenset({"ip_blocks", "not_ip_blocks"})
_PORT_FIELDS = frozenset({"ports", "not_ports"})


def _authz_fields(v: Any, cls: type, fields: Mapping[str, str], what: str, problems: list[str]) -> Any:
    """An AuthzSource / AuthzOperation from Istio's camelCase fields. A field that cannot be read is
    left out and named in `problems` (the rule's action decides what that means)."""
    if v is None:
        return cls()
    if not isinstance(v, Mapping):
        problems.append(f"{what} is not a mapping")
        return cls()
    kwargs: dict[str, tuple[str, ...]] = {}
    for camel, value in v.items():
        f = fields.get(str(camel))
        if f is None:
            problems.append(f"{what}: unknown field {str(camel)!r}")
            continue
        try:
            items = _strs(value, f"{what}.{camel}")
            if f in _CIDR_FIELDS:
                items = tuple(canonical_cidr(x, f"{what}.{camel}", bare_ip=True) for x in items)
            elif f in _PORT_FIELDS:
                items = tuple(str(_int(int(x) if x.isdigit() else x, f"{what}.{camel}", lo=1)) for x in items)
        except ParseError as e:
            problems.append(str(e))
            continue
        kwargs[f] = items
    return cls(**kwargs)


# `when` keys that are facts of L4 (source identity, source address, destination port); the rest
# (request.*, destination.ip, connection.sni, experimental.*) need a proxy and are treated as L7.
WHEN_L4_KEYS = frozenset({"source.principal", "source.namespace", "source.ip", "destination.port"})


def _authz_rule(r: Any, w: str) -> AuthzRule:
    problems: list[str] = []
    if not isinstance(r, Mapping):
        return AuthzRule(problems=(f"{w} is not a mapping",))
    problems += _unknown_fields(r, frozenset({"from", "to", "when"}), w)
    sources: list[Any] = []
    ops: list[Any] = []
    when: list[AuthzCondition] = []
    for field_name, key, cls, fields, out in (("from", "source", AuthzSource, _SOURCE_FIELDS, sources),
                                              ("to", "operation", AuthzOperation, _OPERATION_FIELDS, ops)):
        try:
            items = _list(r.get(field_name), f"{w}.{field_name}")
        except ParseError as e:
            problems.append(str(e))
            continue
        for i, item in enumerate(items):
            where = f"{w}.{field_name}[{i}]"
            if not isinstance(item, Mapping):
                # Kept as a wildcard: a DENY rule must not match fewer peers or ports for an entry it
                # cannot read (an ALLOW rule with problems is dropped whole).
                problems.append(f"{where} is not a mapping; read as matching everything")
                out.append(cls())
                continue
            problems += _unknown_fields(item, frozenset({key}), where)
            out.append(_authz_fields(item.get(key), cls, fields, f"{where}.{key}", problems))
    try:
        conditions = _list(r.get("when"), f"{w}.when")
    except ParseError as e:
        problems.append(str(e))
        conditions = []
    for i, c in enumerate(conditions):
        where = f"{w}.when[{i}]"
        if not isinstance(c, Mapping) or not isinstance(c.get("key"), str):
            problems.append(f"{where} has no key")
            continue
        bad = _unknown_fields(c, frozenset({"key", "values", "notValues"}), where)
        try:
            values = _strs(c.get("values"), f"{where}.values")
            not_values = _strs(c.get("notValues"), f"{where}.notValues")
            if c["key"] == "source.ip":
                values = tuple(canonical_cidr(x, f"{where}.values", bare_ip=True) for x in values)
                not_values = tuple(canonical_cidr(x, f"{where}.notValues", bare_ip=True) for x in not_values)
            elif c["key"] == "destination.port":
                for x in (*values, *not_values):
                    _int(int(x) if x.isdigit() else x, f"{where}.values", lo=1)
        except ParseError as e:
            bad.append(str(e))
        if bad:
            problems += bad
            continue
        when.append(AuthzCondition(c["key"], values, not_values))
    return AuthzRule(tuple(sources), tuple(ops), tuple(when), tuple(problems))


_AP_SPEC_FIELDS = frozenset({"selector", "rules", "action", "provider", "targetRef", "targetRefs"})


def _istio_selector(spec: Mapping[str, Any], what: str, problems: list[str],
                    fallback: str = "read as the whole namespace") -> LabelSelector | None:
    sel = spec.get("selector")
    if sel is None:
        return None
    try:
        return parse_label_selector(sel, f"{what}: spec.selector", strict=True, match_labels_only=True)
    except ParseError as e:
        problems.append(f"{e}; {fallback}")
        return None


def _target_refs(spec: Mapping[str, Any]) -> tuple[str, ...]:
    refs = [spec["targetRef"]] if isinstance(spec.get("targetRef"), Mapping) else []
    refs += [r for r in spec.get("targetRefs") or () if isinstance(r, Mapping)]
    return tuple(f"{r.get('kind', '?')}/{r.get('name', '?')}" for r in refs)


def parse_authorization_policy(obj: Mapping[str, Any]) -> AuthorizationPolicy:
    """Never fails once the object has a name (see AuthorizationPolicy.problems and AuthzRule.problems)."""
    name, ns, meta = _meta(obj, Kind.AUTHORIZATION_POLICY)
    where = f"AuthorizationPolicy {ns}/{name}"
    spec = obj.get("spec") or {}
    problems: list[str] = []
    if not isinstance(spec, Mapping):
        problems.append(f"{where}: spec is not a mapping")
        spec = {}
    problems += _unknown_fields(spec, _AP_SPEC_FIELDS, f"{where}: spec")
    action = str(spec.get("action") or "ALLOW")
    if action not in ("ALLOW", "DENY", "AUDIT", "CUSTOM"):
        problems.append(f"{where}: spec.action={action!r} is not ALLOW, DENY, AUDIT or CUSTOM; read as an ALLOW "
                        "policy that allows nothing")
        action = "ALLOW"
    try:
        items = _list(spec.get("rules"), f"{where}: spec.rules")
    except ParseError as e:
        problems.append(str(e))
        items = []
    rules = tuple(_authz_rule(r, f"{where}: spec.rules[{i}]") for i, r in enumerate(items))
    selector = _istio_selector(spec, where, problems)
    return AuthorizationPolicy(name, ns, selector, action, rules, _rv(meta), tuple(problems), _target_refs(spec),
                               str(meta.get("uid") or ""))


_PA_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")


def _pa_mode(v: Any, what: str, problems: list[str]) -> str:
    mode = "UNSET"
    if v is None:
        return mode
    if not isinstance(v, Mapping):
        problems.append(f"{what} is not a mapping")
        return mode
    problems += _unknown_fields(v, frozenset({"mode"}), what)
    mode = str(v.get("mode") or "UNSET")
    if mode not in _PA_MODES:
        problems.append(f"{what}.mode={mode!r} is not UNSET, DISABLE, PERMISSIVE or STRICT; read as UNSET")
        mode = "UNSET"
    return mode


def parse_peer_authentication(obj: Mapping[str, Any]) -> PeerAuthentication:
    name, ns, meta = _meta(obj, Kind.PEER_AUTHENTICATION)
    where = f"PeerAuthentication {ns}/{name}"
    spec = obj.get("spec") or {}
    problems: list[str] = []
    if not isinstance(spec, Mapping):
        problems.append(f"{where}: spec is not a mapping")
        spec = {}
    problems += _unknown_fields(spec, frozenset({"selector", "mtls", "portLevelMtls"}), f"{where}: spec")
    mode = _pa_mode(spec.get("mtls"), f"{where}: spec.mtls", problems)
    port_level: dict[int, str] = {}
    plm = spec.get("portLevelMtls") or {}
    if not isinstance(plm, Mapping):
        problems.append(f"{where}: spec.portLevelMtls is not a mapping")
        plm = {}
    for port, m in plm.items():
        try:
            p = _int(int(port) if str(port).isdigit() else port, f"{where}: spec.portLevelMtls key", lo=1)
        except ParseError as e:
            problems.append(str(e))
            continue
        port_level[p] = _pa_mode(m, f"{where}: spec.portLevelMtls[{p}]", problems)
    n = len(problems)
    selector = _istio_selector(spec, where, problems, "the policy is ignored")
    if len(problems) > n:  # whom it is for is unknown: it must not set the mode of a whole namespace
        mode, port_level = "UNSET", {}
    return PeerAuthentication(name, ns, selector, mode, _frozen_int_map(port_level), _rv(meta),
                              str(meta.get("creationTimestamp") or ""), tuple(problems), str(meta.get("uid") or ""))


def _frozen_int_map(d: dict[int, str]) -> Mapping[int, str]:
    return MappingProxyType(d)


_DURATION = re.compile(r"(\d{1,5})(ms|h|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(v: Any, what: str) -> float | None:
    """Gateway API duration ("1h", "10s", "500ms", "1m30s") to seconds."""
    if v is None:
        return None
    text = str(v)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ParseError(f"{what}={text!r} is not a duration like 10s, 500ms or 1m30s")
    return sum(int(n) * _UNIT[u] for n, u in parts)


def parse_http_route(obj: Mapping[str, Any]) -> HTTPRoute:
    name, ns, meta = _meta(obj, Kind.HTTP_ROUTE)
    where = f"HTTPRoute {ns}/{name}"
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ParseError(f"{where}: spec is not a mapping")
    parents = []
    for i, p in enumerate(_list(spec.get("parentRefs"), f"{where}: spec.parentRefs")):
        if not isinstance(p, Mapping) or not p.get("name"):
            raise ParseError(f"{where}: spec.parentRefs[{i}] has no name")
        kind = str(p.get("kind") or "Gateway")
        parents.append(ParentRef(
            name=str(p["name"]),
            namespace=str(p.get("namespace") or ns),
            group=str(p.get("group", "gateway.networking.k8s.io" if kind == "Gateway" else "")),
            kind=kind,
            section_name=str(p.get("sectionName") or ""),
            port=None if p.get("port") is None else _int(p["port"], f"{where}: spec.parentRefs[{i}].port", lo=1),
        ))
    rules = []
    for i, r in enumerate(_list(spec.get("rules"), f"{where}: spec.rules")):
        w = f"{where}: spec.rules[{i}]"
        if not isinstance(r, Mapping):
            raise ParseError(f"{w} is not a mapping")
        matches = []
        for j, m in enumerate(_list(r.get("matches"), f"{w}.matches")):
            if not isinstance(m, Mapping):
                raise ParseError(f"{w}.matches[{j}] is not a mapping")
            path = m.get("path")
            matches.append(HTTPRouteMatch(
                path=PathMatch(str(path.get("type") or "PathPrefix"), str(path.get("value") or "/"))
                if isinstance(path, Mapping) else None,
                headers=tuple(HeaderMatch(str(h.get("type") or "Exact"), str(h.get("name") or ""),
                                          str(h.get("value") or ""))
                              for h in _list(m.get("headers"), f"{w}.matches[{j}].headers")),
                query_params=tuple(HeaderMatch(str(h.get("type") or "Exact"), str(h.get("name") or ""),
                                               str(h.get("value") or ""))
                                   for h in _list(m.get("queryParams"), f"{w}.matches[{j}].queryParams")),
                method=str(m.get("method") or ""),
            ))
        backends = []
        for j, b in enumerate(_list(r.get("backendRefs"), f"{w}.backendRefs")):
            if not isinstance(b, Mapping) or not b.get("name"):
                raise ParseError(f"{w}.backendRefs[{j}] has no name")
            backends.append(BackendRef(
                name=str(b["name"]),
                namespace=str(b.get("namespace") or ns),
                port=None if b.get("port") is None else _int(b["port"], f"{w}.backendRefs[{j}].port", lo=1),
                weight=_int(b.get("weight", 1), f"{w}.backendRefs[{j}].weight", hi=1_000_000),
                group=str(b.get("group") or ""),
                kind=str(b.get("kind") or "Service"),
            ))
        timeouts = r.get("timeouts") or {}
        retry = r.get("retry")
        rules.append(HTTPRouteRule(
            matches=tuple(matches),
            backend_refs=tuple(backends),
            request_timeout_seconds=parse_duration(timeouts.get("request"), f"{w}.timeouts.request"),
            backend_request_timeout_seconds=parse_duration(timeouts.get("backendRequest"),
                                                           f"{w}.timeouts.backendRequest"),
            retry=HTTPRouteRetry(
                attempts=None if retry.get("attempts") is None else _int(retry["attempts"], f"{w}.retry.attempts"),
                backoff_seconds=parse_duration(retry.get("backoff"), f"{w}.retry.backoff"),
                codes=tuple(_int(c, f"{w}.retry.codes", lo=100, hi=599) for c in _list(retry.get("codes"), "codes")),
            ) if isinstance(retry, Mapping) else None,
            name=str(r.get("name") or ""),
        ))
    return HTTPRoute(name, ns, tuple(parents), _strs(spec.get("hostnames"), f"{where}: spec.hostnames"),
                     tuple(rules), _rv(meta))


PARSERS: dict[Kind, Callable[[Mapping[str, Any]], Record]] = {
    Kind.POD: parse_pod,
    Kind.NAMESPACE: parse_namespace,
    Kind.SERVICE: parse_service,
    Kind.ENDPOINT_SLICE: parse_endpoint_slice,
    Kind.NETWORK_POLICY: parse_network_policy,
    Kind.AUTHORIZATION_POLICY: parse_authorization_policy,
    Kind.PEER_AUTHENTICATION: parse_peer_authentication,
    Kind.HTTP_ROUTE: parse_http_route,
}


def kind_of(obj: Any) -> Kind:
    """The Kind of a raw object; ParseError if it is not a Kubernetes object, NotOurKind if we skip it."""
    if not isinstance(obj, Mapping):
        raise ParseError(f"not a Kubernetes object (a {type(obj).__name__}, not a mapping)")
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str) or not api_version or not kind:
        raise ParseError("not a Kubernetes object (apiVersion and kind are required)")
    group = api_version.rpartition("/")[0]
    try:
        k = Kind(kind)
    except ValueError:
        raise NotOurKind(f"{api_version} {kind}") from None
    if API_KINDS[k].group != group:
        raise NotOurKind(f"{api_version} {kind}")
    return k


def parse_object(obj: Any, kind: Kind | None = None) -> Record:
    """A raw object to its record; `kind` when known from the API path (list items carry no kind)."""
    k = kind if kind is not None else kind_of(obj)
    if not isinstance(obj, Mapping):
        raise ParseError(f"{k}: not a mapping")
    try:
        return PARSERS[k](obj)
    except ParseError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        # A field of the wrong shape deep inside: still one line, naming the object.
        m = obj.get("metadata")
        meta: Mapping[str, Any] = m if isinstance(m, Mapping) else {}
        raise ParseError(f"{k} {meta.get('namespace', '')}/{meta.get('name', '?')}: malformed ({e})") from None
