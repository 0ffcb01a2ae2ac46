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


def parse_label_selector(v: Any, what: str) -> LabelSelector:
    if v is None:
        return LabelSelector()
    if not isinstance(v, Mapping):
        raise ParseError(f"{what} is not a mapping")
    exprs = []
    for i, r in enumerate(_list(v.get("matchExpressions"), f"{what}.matchExpressions")):
        if not isinstance(r, Mapping) or r.get("operator") not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ParseError(f"{what}.matchExpressions[{i}] has no valid operator")
        exprs.append(LabelSelectorRequirement(str(r.get("key") or ""), str(r["operator"]),
                                              _strs(r.get("values"), f"{what}.matchExpressions[{i}].values")))
    return LabelSelector(frozen_map(_strmap(v.get("matchLabels"), f"{what}.matchLabels")), tuple(exprs))


def _np_rule(r: Any, peers_field: str, what: str) -> NetworkPolicyRule:
    if not isinstance(r, Mapping):
        raise ParseError(f"{what} is not a mapping")
    peers = []
    for i, p in enumerate(_list(r.get(peers_field), f"{what}.{peers_field}")):
        if not isinstance(p, Mapping):
            raise ParseError(f"{what}.{peers_field}[{i}] is not a mapping")
        block = p.get("ipBlock")
        peers.append(
            NetworkPolicyPeer(
                pod_selector=parse_label_selector(p["podSelector"], f"{what}.podSelector") if "podSelector" in p else None,
                namespace_selector=parse_label_selector(p["namespaceSelector"], f"{what}.namespaceSelector")
                if "namespaceSelector" in p
                else None,
                ip_block=IPBlock(str(block.get("cidr") or ""), _strs(block.get("except"), f"{what}.ipBlock.except"))
                if isinstance(block, Mapping)
                else None,
            )
        )
    ports = []
    for i, p in enumerate(_list(r.get("ports"), f"{what}.ports")):
        if not isinstance(p, Mapping):
            raise ParseError(f"{what}.ports[{i}] is not a mapping")
        port = p.get("port")
        end = p.get("endPort")
        ports.append(
            NetworkPolicyPort(
                protocol=str(p.get("protocol") or "TCP"),
                port=None if port is None else _int_or_name(port, f"{what}.ports[{i}].port"),
                end_port=None if end is None else _int(end, f"{what}.ports[{i}].endPort", lo=1),
            )
        )
    return NetworkPolicyRule(tuple(peers), tuple(ports))


def parse_network_policy(obj: Mapping[str, Any]) -> NetworkPolicy:
    name, ns, meta = _meta(obj, Kind.NETWORK_POLICY)
    where = f"NetworkPolicy {ns}/{name}"
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ParseError(f"{where}: spec is not a mapping")
    ingress = tuple(_np_rule(r, "from", f"{where}: spec.ingress[{i}]")
                    for i, r in enumerate(_list(spec.get("ingress"), f"{where}: spec.ingress")))
    egress = tuple(_np_rule(r, "to", f"{where}: spec.egress[{i}]")
                   for i, r in enumerate(_list(spec.get("egress"), f"{where}: spec.egress")))
    types = _strs(spec.get("policyTypes"), f"{where}: spec.policyTypes") or (
        ("Ingress", "Egress") if egress else ("Ingress",)
    )
    return NetworkPolicy(
        name=name,
        namespace=ns,
        pod_selector=parse_label_selector(spec.get("podSelector"), f"{where}: spec.podSelector"),
        policy_types=types,
        ingress=ingress,
        egress=egress,
        resource_version=_rv(meta),
    )


def _camel_fields(v: Any, cls: type, what: str) -> Any:
    """Build an Authz* record whose fields are all string lists, from the camelCase Istio fields."""
    if v is None:
        return cls()
    if not isinstance(v, Mapping):
        raise ParseError(f"{what} is not a mapping")
    kwargs = {}
    for f in cls.__dataclass_fields__:  # type: ignore[attr-defined]
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), f)
        if camel in v:
            kwargs[f] = _strs(v[camel], f"{what}.{camel}")
    return cls(**kwargs)


def _istio_selector(spec: Mapping[str, Any], what: str) -> LabelSelector | None:
    sel = spec.get("selector")
    if sel is None:
        return None
    return parse_label_selector(sel, f"{what}: spec.selector")


def parse_authorization_policy(obj: Mapping[str, Any]) -> AuthorizationPolicy:
    name, ns, meta = _meta(obj, Kind.AUTHORIZATION_POLICY)
    where = f"AuthorizationPolicy {ns}/{name}"
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ParseError(f"{where}: spec is not a mapping")
    action = str(spec.get("action") or "ALLOW")
    if action not in ("ALLOW", "DENY", "AUDIT", "CUSTOM"):
        raise ParseError(f"{where}: spec.action={action!r} is not ALLOW, DENY, AUDIT or CUSTOM")
    rules = []
    for i, r in enumerate(_list(spec.get("rules"), f"{where}: spec.rules")):
        w = f"{where}: spec.rules[{i}]"
        if not isinstance(r, Mapping):
            raise ParseError(f"{w} is not a mapping")
        sources = tuple(_camel_fields((f or {}).get("source"), AuthzSource, f"{w}.from.source")
                        for f in _list(r.get("from"), f"{w}.from"))
        ops = tuple(_camel_fields((t or {}).get("operation"), AuthzOperation, f"{w}.to.operation")
                    for t in _list(r.get("to"), f"{w}.to"))
        when = tuple(AuthzCondition(
            key=str((c or {}).get("key") or ""),
            values=_strs((c or {}).get("values"), f"{w}.when.values"),
            not_values=_strs((c or {}).get("notValues"), f"{w}.when.notValues"),
        ) for c in _list(r.get("when"), f"{w}.when"))
        rules.append(AuthzRule(sources, ops, when))
    return AuthorizationPolicy(name, ns, _istio_selector(spec, where), action, tuple(rules), _rv(meta))


def parse_peer_authentication(obj: Mapping[str, Any]) -> PeerAuthentication:
    name, ns, meta = _meta(obj, Kind.PEER_AUTHENTICATION)
    where = f"PeerAuthentication {ns}/{name}"
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ParseError(f"{where}: spec is not a mapping")
    mode = str((spec.get("mtls") or {}).get("mode") or "UNSET")
    port_level: dict[int, str] = {}
    plm = spec.get("portLevelMtls") or {}
    if not isinstance(plm, Mapping):
        raise ParseError(f"{where}: spec.portLevelMtls is not a mapping")
    for port, m in plm.items():
        p = _int(int(port) if str(port).isdigit() else port, f"{where}: spec.portLevelMtls key", lo=1)
        port_level[p] = str((m or {}).get("mode") or "UNSET")
    return PeerAuthentication(name, ns, _istio_selector(spec, where), mode,
                              _frozen_int_map(port_level), _rv(meta))


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
