"""From the state model to Envoy resources: a pure function, callable without a server.

Which Services are L7 is decided in one place (model.service_is_l7). Each TCP port of an L7 service gets one listener (address chosen by
`L7Options.listener_address`) and one route configuration; the routes come from the attached
HTTPRoutes (or, without any, send everything to the service itself). Every backend (Service, port)
a route names becomes an EDS cluster whose endpoints are the ready addresses of its EndpointSlices.
Non-L7 services produce nothing.

Names: listener and route config `l7|<ns>|<svc>|<port>`, cluster `svc|<ns>|<svc>|<port>`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from envoy.config.route.v3 import route_components_pb2

from accel.state.model import (
    BackendRef,
    EndpointSlice,
    HTTPRoute,
    HTTPRouteMatch,
    HTTPRouteRule,
    Service,
    ServicePort,
    attached_routes,
    service_is_l7,
)
from meshxds import resources as R
from meshxds.cache import Resources


def _loopback_service_port(svc: Service, port: ServicePort) -> tuple[str, int]:
    return "127.0.0.1", port.port


@dataclass(frozen=True, slots=True)
class L7Options:
    # Where Envoy listens for one (service, port); the connect hook sends that service's connections there.
    listener_address: Callable[[Service, ServicePort], tuple[str, int]] = _loopback_service_port


def listener_name(ns: str, svc: str, port: int) -> str:
    return f"l7|{ns}|{svc}|{port}"


def cluster_name(ns: str, svc: str, port: int) -> str:
    return f"svc|{ns}|{svc}|{port}"


def translate(
    services: Iterable[Service],
    slices: Iterable[EndpointSlice],
    routes: Iterable[HTTPRoute],
    options: L7Options | None = None,
) -> Resources:
    opts = options or L7Options()
    services, routes = list(services), list(routes)
    by_key = {(s.namespace, s.name): s for s in services}
    slices_by_svc: dict[tuple[str, str], list[EndpointSlice]] = {}
    for sl in slices:
        if sl.service_name:
            slices_by_svc.setdefault((sl.namespace, sl.service_name), []).append(sl)
    problems: list[str] = []
    listeners, route_configs = [], []
    wanted_clusters: set[tuple[str, str, int]] = set()

    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        if not service_is_l7(svc, routes):
            continue
        attached = attached_routes(svc, routes)
        for port in svc.ports:
            if port.protocol != "TCP":
                continue
            name = listener_name(svc.namespace, svc.name, port.port)
            rules = [(r, rule, i) for r, p in attached if p in (None, port.port) for i, rule in enumerate(r.rules)]
            env_routes = []
            if rules:
                for r, rule, i in _ordered(rules):
                    clusters = _backends(r, rule, by_key, problems)
                    for ns, svc_name, svc_port, _w in clusters:
                        wanted_clusters.add((ns, svc_name, svc_port))
                    action = _action(rule, [(cluster_name(ns, n, p), w) for ns, n, p, w in clusters])
                    for m in rule.matches or (HTTPRouteMatch(),):
                        route = _route(m, action)
                        route.name = f"HTTPRoute/{r.namespace}/{r.name}[{i}]"  # what a request's flow names
                        env_routes.append(route)
            else:
                wanted_clusters.add((svc.namespace, svc.name, port.port))
                env_routes.append(route_components_pb2.Route(
                    name="default", match=R.route_match(),
                    route=R.route_action([(cluster_name(svc.namespace, svc.name, port.port), 1)])))
            ip, lport = opts.listener_address(svc, port)
            listeners.append(R.http_listener(name, ip, lport, name))
            route_configs.append(R.route_config(name, env_routes))

    clusters, assignments = [], []
    for ns, svc_name, svc_port in sorted(wanted_clusters):
        cname = cluster_name(ns, svc_name, svc_port)
        clusters.append(R.eds_cluster(cname))
        backend_svc = by_key.get((ns, svc_name))
        if backend_svc is None:
            problems.append(f"backend Service {ns}/{svc_name} not found: cluster {cname} has no endpoints")
            assignments.append(R.load_assignment(cname, []))
            continue
        assignments.append(R.load_assignment(cname, _endpoints(backend_svc, svc_port,
                                                               slices_by_svc.get((ns, svc_name), []))))
    return Resources(tuple(clusters), tuple(assignments), tuple(listeners), tuple(route_configs), tuple(problems))


def _ordered(rules: list[tuple[HTTPRoute, HTTPRouteRule, int]]) -> list[tuple[HTTPRoute, HTTPRouteRule, int]]:
    """Gateway API precedence, applied per rule by its most specific match: exact path, longest
    prefix, method, most headers, most query params; then route namespace/name and rule order."""
    def key(item: tuple[HTTPRoute, HTTPRouteRule, int]) -> tuple[object, ...]:
        r, rule, i = item
        m = min((_match_rank(m) for m in rule.matches), default=_match_rank(HTTPRouteMatch()))
        return (*m, r.namespace, r.name, i)
    return sorted(rules, key=key)


def _match_rank(m: HTTPRouteMatch) -> tuple[int, int, int, int, int]:
    ptype = m.path.type if m.path else "PathPrefix"
    plen = len(m.path.value) if m.path else 1
    kind = {"Exact": 0, "RegularExpression": 1}.get(ptype, 2)
    return kind, -plen, -int(bool(m.method)), -len(m.headers), -len(m.query_params)


def _route(m: HTTPRouteMatch, action: route_components_pb2.RouteAction | None) -> route_components_pb2.Route:
    headers = [(h.type, h.name, h.value) for h in m.headers]
    if m.method:
        headers.append(("Exact", ":method", m.method))
    match = R.route_match(m.path.type if m.path else "PathPrefix", m.path.value if m.path else "/", headers)
    for q in m.query_params:
        match.query_parameters.append(route_components_pb2.QueryParameterMatcher(
            name=q.name, string_match=R.string_match(q.type, q.value)))
    if action is None:  # no usable backend: Gateway API says answer 500
        return route_components_pb2.Route(match=match, direct_response=route_components_pb2.DirectResponseAction(
            status=500))
    return route_components_pb2.Route(match=match, route=action)


def _backends(route: HTTPRoute, rule: HTTPRouteRule, services: Mapping[tuple[str, str], Service],
              problems: list[str]) -> list[tuple[str, str, int, int]]:
    out = []
    for b in rule.backend_refs:
        port = _backend_port(b, services)
        if b.kind != "Service" or b.group not in ("", "core"):
            problems.append(f"HTTPRoute {route.namespace}/{route.name}: backendRef {b.kind} {b.name} is not a Service")
        elif port is None:
            problems.append(f"HTTPRoute {route.namespace}/{route.name}: backendRef {b.namespace}/{b.name} has no port")
        elif b.weight > 0:
            out.append((b.namespace, b.name, port, b.weight))
    return out


def _backend_port(b: BackendRef, services: Mapping[tuple[str, str], Service]) -> int | None:
    if b.port is not None:
        return b.port
    svc = services.get((b.namespace, b.name))  # Gateway API requires a port; be lenient with one-port services
    return svc.ports[0].port if svc is not None and len(svc.ports) == 1 else None


def _action(rule: HTTPRouteRule, clusters: list[tuple[str, int]]) -> route_components_pb2.RouteAction | None:
    if not clusters:
        return None
    retry = None
    if rule.retry is not None and (rule.retry.attempts or 0) > 0:
        retry = R.retry_policy(rule.retry.attempts or 0, rule.retry.codes, rule.retry.backoff_seconds,
                               rule.backend_request_timeout_seconds)
    timeout = rule.request_timeout_seconds
    if timeout is None and retry is None:
        timeout = rule.backend_request_timeout_seconds
    return R.route_action(clusters, timeout, retry)


def _endpoints(svc: Service, svc_port: int, slices: list[EndpointSlice]) -> list[R.Backend]:
    """Ready endpoint addresses with the slice port that matches the service port (by name)."""
    sp = next((p for p in svc.ports if p.port == svc_port), None)
    if sp is None:
        return []
    out: set[tuple[str, int]] = set()
    for sl in slices:
        if sl.address_type not in ("IPv4", "IPv6"):
            continue
        port = next((p.port for p in sl.ports if p.name == sp.name and p.protocol == sp.protocol), None)
        if port is None and isinstance(sp.target_port, int) and not sl.ports:
            port = sp.target_port
        if port is None:
            continue
        for ep in sl.endpoints:
            if ep.ready:
                out.update((a, port) for a in ep.addresses)
    return [R.Backend(ip, port) for ip, port in sorted(out)]
