"""The public record types of the state model: frozen, slotted, plain data.

Sources turn Kubernetes objects into these records at the edge (accel/state/parse.py); everything
downstream (reconcilers, the xDS translation, the cert manager) reads only these types.
Mappings inside records are read-only views (`frozen_map`), so a record can never change after it
has been handed out. Records compare by value.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

EMPTY_MAP: Mapping[str, str] = MappingProxyType({})


def frozen_map(d: Mapping[str, str] | None) -> Mapping[str, str]:
    """A read-only copy of `d` (an empty shared view for None/empty)."""
    if not d:
        return EMPTY_MAP
    return MappingProxyType(dict(d))


# The annotations and labels meshaccel reads (DESIGN.md), named once.
ANNOTATION_PREFIX = "meshaccel.io/"
MTLS_ANNOTATION = "meshaccel.io/mtls"  # strict | permissive | disable, on a Namespace or Pod (the pod wins)
L7_ANNOTATION = "meshaccel.io/l7"  # "true" on a Service: its TCP ports go through the node Envoy
EXCLUDE_LABEL = "meshaccel.io/exclude"  # "true" on a Pod or Namespace: meshaccel leaves it alone
ISTIO_SIDECAR_STATUS = "sidecar.istio.io/status"  # set by Istio's injector on pods with a sidecar
ISTIO_DATAPLANE_MODE = "istio.io/dataplane-mode"  # "ambient" on a Pod or Namespace: Istio ambient


class Kind(enum.StrEnum):
    """The kinds the sources read and the model keeps."""

    POD = "Pod"
    NAMESPACE = "Namespace"
    SERVICE = "Service"
    ENDPOINT_SLICE = "EndpointSlice"
    NETWORK_POLICY = "NetworkPolicy"
    AUTHORIZATION_POLICY = "AuthorizationPolicy"
    PEER_AUTHENTICATION = "PeerAuthentication"
    HTTP_ROUTE = "HTTPRoute"

    # Enum's own __hash__ is Python code; keys are hashed on every model lookup, so use str's (same value).
    __hash__ = str.__hash__


class MtlsMode(enum.StrEnum):
    """`meshaccel.io/mtls` values (DESIGN.md: Transparent mTLS)."""

    STRICT = "strict"
    PERMISSIVE = "permissive"
    DISABLE = "disable"


class ObjectKey(NamedTuple):
    """Identifies one object of one kind; namespace is "" for cluster-scoped kinds.
    A NamedTuple rather than a dataclass: hashing and comparing keys is the model's hottest path."""

    kind: Kind
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}" if self.namespace else f"{self.kind}/{self.name}"


# --- Pods and namespaces -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerPort:
    """A named container port (spec.containers[].ports[] with a name): what a NetworkPolicy port name
    or a Service targetPort name resolves to on this pod."""

    name: str
    protocol: str  # TCP | UDP | SCTP
    port: int


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    namespace: str
    uid: str
    node: str  # spec.nodeName, "" while unscheduled
    ips: tuple[str, ...]  # status.podIPs (v4 and/or v6), canonical text form
    labels: Mapping[str, str]
    service_account: str  # spec.serviceAccountName, "default" when unset
    annotations: Mapping[str, str]  # only the annotations of interest (ANNOTATIONS_OF_INTEREST)
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    ready: bool  # condition Ready == True
    host_network: bool
    resource_version: str = ""
    named_ports: tuple[ContainerPort, ...] = ()  # only ports that have a name

    kind = Kind.POD

    def port_named(self, name: str, protocol: str) -> int | None:
        for p in self.named_ports:
            if p.name == name and p.protocol == protocol:
                return p.port
        return None

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(Kind.POD, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    uid: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]  # only the annotations of interest
    resource_version: str = ""

    kind = Kind.NAMESPACE

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(Kind.NAMESPACE, "", self.name)


# --- Services and endpoints ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: str  # TCP | UDP | SCTP
    port: int
    target_port: int | str  # a number, or the name of a container port
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    uid: str
    type: str  # ClusterIP | NodePort | LoadBalancer | ExternalName
    cluster_ips: tuple[str, ...]  # spec.clusterIPs; empty for headless ("None") services
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] | None  # None: no selector, endpoints are managed by hand
    session_affinity: str  # None | ClientIP
    session_affinity_timeout: int | None  # seconds, ClientIP only
    internal_traffic_policy: str  # Cluster | Local
    labels: Mapping[str, str]
    annotations: Mapping[str, str]  # only the annotations of interest
    resource_version: str = ""

    kind = Kind.SERVICE

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(Kind.SERVICE, self.namespace, self.name)

    @property
    def l7(self) -> bool:
        """Opted into L7 by annotation (an attached HTTPRoute also opts in: see service_is_l7)."""
        return self.annotations.get(L7_ANNOTATION, "").lower() == "true"


@dataclass(frozen=True, slots=True)
class TargetRef:
    kind: str
    namespace: str
    name: str
    uid: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[str, ...]
    ready: bool  # conditions.ready (unset counts as ready, as the API says)
    serving: bool  # conditions.serving (unset: same as ready)
    terminating: bool  # conditions.terminating (unset: false)
    node_name: str = ""
    target_ref: TargetRef | None = None
    zone: str = ""
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    protocol: str
    port: int | None  # None means "all ports" in the API
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    name: str
    namespace: str
    service_name: str  # label kubernetes.io/service-name, "" when missing
    address_type: str  # IPv4 | IPv6 | FQDN
    endpoints: tuple[Endpoint, ...]
    ports: tuple[EndpointPort, ...]
    resource_version: str = ""

    kind = Kind.ENDPOINT_SLICE

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(Kind.ENDPOINT_SLICE, self.namespace, self.name)


# --- Policy --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelSelectorRequirement:
    key: str
    operator: str  # In | NotIn | Exists | DoesNotExist
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A Kubernetes label selector; the empty selector matches everything."""

    match_labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    match_expressions: tuple[LabelSelectorRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for r in self.match_expressions:
            present = r.key in labels
            if r.operator == "In" and (not present or labels[r.key] not in r.values):
                return False
            if r.operator == "NotIn" and present and labels[r.key] in r.values:
                return False
            if r.operator == "Exists" and not present:
                return False
            if r.operator == "DoesNotExist" and present:
                return False
        return True


@dataclass(frozen=True, slots=True)
class IPBlock:
    cidr: str
    except_: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkPolicyPeer:
    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True, slots=True)
class NetworkPolicyPort:
    protocol: str  # TCP when unset
    port: int | str | None  # None: all ports
    end_port: int | None = None


@dataclass(frozen=True, slots=True)
class NetworkPolicyRule:
    peers: tuple[NetworkPolicyPeer, ...]  # empty: all peers
    ports: tuple[NetworkPolicyPort, ...]  # empty: all ports
    # What made this rule unreadable (unknown field, bad value): a rule with problems allows nothing.
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """networking.k8s.io/v1 NetworkPolicy, kept even when parts of it are unreadable: a policy we
    cannot read must still isolate what it selects (accel/policy never turns bad input into allow)."""

    name: str
    namespace: str
    pod_selector: LabelSelector  # the empty selector (whole namespace) when spec.podSelector is unreadable
    policy_types: tuple[str, ...]  # Ingress and/or Egress, defaulted as the API does
    ingress: tuple[NetworkPolicyRule, ...]
    egress: tuple[NetworkPolicyRule, ...]
    resource_version: str = ""
    # Problems with the spec itself (unknown spec field, unreadable selector or policyTypes): the policy
    # then isolates what it selects and allows nothing.
    problems: tuple[str, ...] = ()
    uid: str = ""  # metadata.uid: names the object in the Events reported on it

    kind = Kind.NETWORK_POLICY

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(Kind.NETWORK_POLICY, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class AuthzSource:
    """Istio `Source`; every field is a list of strings in the API."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()

    @property
    def has_l7(self) -> bool:
        """Fields only an HTTP proxy can check: JWT principals, and client IPs from X-Forwarded-For."""
        return bool(self.request_principals or self.not_request_principals or self.remote_ip_blocks
                    or self.not_remote_ip_blocks)


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    """Istio `Operation`: ports are L4; hosts, methods and paths are L7."""

    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    @property
    def has_l7(self) -> bool:
        return bool(self.hosts or self.not_hosts or self.methods or self.not_methods or self.paths or self.not_paths)


@dataclass(frozen=True, slots=True)
class AuthzCondition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzRule:
    sources: tuple[AuthzSource, ...] = ()  # rule.from[].source
    operations: tuple[AuthzOperation, ...] = ()  # rule.to[].operation
    when: tuple[AuthzCondition, ...] = ()
    # Unknown or unreadable fields, left out of the record: an ALLOW rule with problems is dropped,
    # a DENY rule is enforced without them (it then matches more, never less).
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """security.istio.io/v1 AuthorizationPolicy, kept even when parts of it are unreadable."""

    name: str
    namespace: str
    selector: LabelSelector | None  # spec.selector (matchLabels only in Istio); None: whole namespace
    action: str  # ALLOW | DENY | AUDIT | CUSTOM (anything else is a problem and allows nothing)
    rules: tuple[AuthzRule, ...]
    resource_version: str = ""
    # Problems with the spec itself (unknown spec field, unreadable selector, rules or action): an ALLOW
    # policy then allows nothing, a DENY policy keeps the rules it could read.
    problems: tuple[str, ...] = ()
    target_refs: tuple[str, ...] = ()  # spec.targetRef(s) as "Kind/name": the policy is for a waypoint or gateway
    uid: str = ""

    kind = Kind.AUTHORIZATION_POLICY

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(Kind.AUTHORIZATION_POLICY, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """security.istio.io/v1 PeerAuthentication."""

    name: str
    namespace: str
    selector: LabelSelector | None
    mtls_mode: str  # UNSET | DISABLE | PERMISSIVE | STRICT
    port_level_mtls: Mapping[int, str]
    resource_version: str = ""
    creation_timestamp: str = ""  # RFC 3339: among equally specific policies the oldest wins (Istio's rule)
    problems: tuple[str, ...] = ()  # unknown fields, unreadable selector or mode
    uid: str = ""

    kind = Kind.PEER_AUTHENTICATION

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(Kind.PEER_AUTHENTICATION, self.namespace, self.name)


# --- Gateway API HTTPRoute (gateway.networking.k8s.io/v1) ----------------------------------------


@dataclass(frozen=True, slots=True)
class ParentRef:
    name: str
    namespace: str  # defaults to the route's namespace
    group: str = "gateway.networking.k8s.io"
    kind: str = "Gateway"  # "Service" for mesh (GAMMA) attachment, with group ""
    section_name: str = ""
    port: int | None = None


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: str  # Exact | PathPrefix | RegularExpression
    value: str


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    type: str  # Exact | RegularExpression
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class HTTPRouteMatch:
    path: PathMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[HeaderMatch, ...] = ()
    method: str = ""


@dataclass(frozen=True, slots=True)
class BackendRef:
    name: str
    namespace: str  # defaults to the route's namespace
    port: int | None
    weight: int = 1
    group: str = ""
    kind: str = "Service"


@dataclass(frozen=True, slots=True)
class HTTPRouteRetry:
    attempts: int | None = None
    backoff_seconds: float | None = None
    codes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class HTTPRouteRule:
    matches: tuple[HTTPRouteMatch, ...]  # empty: match everything (PathPrefix "/")
    backend_refs: tuple[BackendRef, ...]
    request_timeout_seconds: float | None = None  # timeouts.request
    backend_request_timeout_seconds: float | None = None  # timeouts.backendRequest
    retry: HTTPRouteRetry | None = None
    name: str = ""


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str
    namespace: str
    parent_refs: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[HTTPRouteRule, ...]
    resource_version: str = ""

    kind = Kind.HTTP_ROUTE

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(Kind.HTTP_ROUTE, self.namespace, self.name)


# --- Decisions about records, written once -------------------------------------------------------


def attached_routes(svc: Service, routes: Iterable[HTTPRoute]) -> list[tuple[HTTPRoute, int | None]]:
    """HTTPRoutes attached to `svc` the GAMMA way (a parentRef of kind Service in the core group), with
    the parentRef's port (None = every port), in a stable order."""
    out = []
    for r in routes:
        for p in r.parent_refs:
            if p.kind == "Service" and p.group in ("", "core") and p.name == svc.name and p.namespace == svc.namespace:
                out.append((r, p.port))
    return sorted(out, key=lambda rp: (rp[0].namespace, rp[0].name, rp[1] or 0))


def service_is_l7(svc: Service, routes: Iterable[HTTPRoute]) -> bool:
    """A Service goes through the node Envoy when it says so (`meshaccel.io/l7`) or an HTTPRoute attaches."""
    return svc.l7 or bool(attached_routes(svc, routes))


Record = Pod | Namespace | Service | EndpointSlice | NetworkPolicy | AuthorizationPolicy | PeerAuthentication | HTTPRoute


# --- Derived -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """A workload identity: the SPIFFE ID and the u32 the kernel uses for it (never 0)."""

    spiffe_id: str
    number: int


@dataclass(frozen=True, slots=True)
class SecurityIdentity:
    """What a security identity number stands for (POLICY.md "Identities"): every pod with these
    (namespace, service account, labels) has it, so every NetworkPolicy selector and every Istio
    principal is a function of the number (with the namespace's current labels)."""

    number: int
    namespace: str
    service_account: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Workload:
    """What the data path needs to know about one pod, derived from the pod and its namespace."""

    pod: Pod
    identity: Identity
    mtls: MtlsMode
    istio_sidecar: bool  # annotation sidecar.istio.io/status present
    istio_ambient: bool  # istio.io/dataplane-mode=ambient on the pod or its namespace
    excluded: bool  # label meshaccel.io/exclude="true" on the pod or its namespace
    # The policy identity (accel.state.identity.SECURITY_MIN and up), shared by pods of equal
    # (namespace, service account, labels); ClusterState.security_identity(n) says what it stands for.
    security_identity: int = 0
    mtls_source: str = ""  # what decided `mtls`: pod | namespace | PeerAuthentication/<ns>/<name> | default

    @property
    def key(self) -> ObjectKey:
        return self.pod.key

    @property
    def istio_managed(self) -> bool:
        return self.istio_sidecar or self.istio_ambient


# --- Events and changes --------------------------------------------------------------------------


class EventType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True, slots=True)
class Event:
    """One object event from a source. For DELETED, `record` is the last known state (may be stale)."""

    type: EventType
    record: Record

    @property
    def key(self) -> ObjectKey:
        return self.record.key


@dataclass(frozen=True, slots=True)
class Change:
    """What one applied batch did to one object: old None = added, new None = deleted."""

    key: ObjectKey
    old: Record | None
    new: Record | None


@dataclass(frozen=True, slots=True)
class WorkloadChange:
    """A pod's derived view changed (its pod, namespace, identity or mode): old None = appeared."""

    key: ObjectKey
    old: Workload | None
    new: Workload | None


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """Everything one applied batch changed, handed to each subscriber once.
    `synced` is True on the batch that completes (or re-completes) a full sync from the source."""

    changes: tuple[Change, ...] = ()
    workloads: tuple[WorkloadChange, ...] = ()
    synced: bool = False
