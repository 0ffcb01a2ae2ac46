"""Envoy resources for HBONE, the tunnel Istio ambient uses between nodes: HTTP/2 CONNECT over mutual
TLS 1.3 to port 15008 of the destination pod, `:authority` = the original `ip:port`.

This module knows Envoy and the wire, not our model: the agent decides which pods get what
(accel/mesh_xds.py). Three pieces:
- `capture_listener`: in an enrolled pod's own network namespace, on 127.0.0.1:15001 and [::1]:15001,
  where the connect hook sends the pod's connections to enrolled pods on other nodes. The original
  destination comes from SO_ORIGINAL_DST (answered by the getsockopt eBPF program); tcp_proxy opens a
  CONNECT tunnel to it through the source identity's origination cluster.
- `origination_cluster`: one per local source identity (so Envoy's config grows with the pods of its node,
  not of the cluster): ORIGINAL_DST with the port replaced by 15008, TLS with that identity's certificate.
- `inbound_listener`: on the pod's addresses, port 15008, inside its namespace: terminates mTLS and
  CONNECT, refuses what is not HBONE for this pod (400), maps a policy deny to 401, and hands the
  stream to `delivery_cluster`, which connects to the `:authority` given.

Wire details follow ztunnel: TLS 1.3 only, ALPN h2 required on both sides, HTTP/2 windows 4 MiB per
stream and 16 MiB per connection, a PING every 10 s. Certificates and trust bundles come by SDS.
Cipher suites, a fact found by testing: Envoy cannot narrow TLS 1.3 suites except through BoringSSL's
FIPS 202205 policy, and that policy re-opens TLS 1.2 (it resets the minimum version and the TLS 1.2
cipher list after Envoy sets them). TLS 1.3 only wins: AES-GCM is what gets negotiated with every peer
that offers it (ztunnel offers nothing else; Envoy and OpenSSL clients put it first), and a client
offering ChaCha20-Poly1305 alone is accepted.

A limit, stated: the client checks that the server presents a SPIFFE identity of our trust domain
signed by our roots, not that it is the identity of that exact destination pod. Doing the latter in
Envoy needs a per-destination table (a cluster, a SAN list or a filter chain per remote workload), which
is what made Envoy node proxies grow with the cluster; the destination's node can only obtain
certificates for pods scheduled on it (certs/), which is the guarantee we lean on instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, protocol_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import wrappers_pb2

from meshxds.access_log import tcp_proxy_log_options
from meshxds.resources import ads, duration, pack, sds_secret_config

CAPTURE_PORT = 15001
HBONE_PORT = 15008
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
PING_INTERVAL_S = 10.0
PING_TIMEOUT_S = 20.0
HANDSHAKE_TIMEOUT_S = 10.0  # a client that stalls in TLS or before its CONNECT is cut after this


def _address(ip: str, port: int, netns: str) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(
        address=ip, port_value=port, network_namespace_filepath=netns))


def _addresses(listener: listener_pb2.Listener, ips: Sequence[str], port: int, netns: str) -> None:
    listener.address.CopyFrom(_address(ips[0], port, netns))
    for ip in ips[1:]:
        listener.additional_addresses.append(listener_pb2.AdditionalAddress(address=_address(ip, port, netns)))


def _tls_params() -> common_pb2.TlsParameters:
    return common_pb2.TlsParameters(tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_3,
                                    tls_maximum_protocol_version=common_pb2.TlsParameters.TLSv1_3)


def _common_tls(cert_secret: str, trust_secret: str, trust_domain: str) -> tls_pb2.CommonTlsContext:
    """Our certificate, the peer checked against our roots and required to be a SPIFFE ID of our domain."""
    peer = common_pb2.CertificateValidationContext(match_typed_subject_alt_names=[
        common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI,
                                         matcher=string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain}/"))])
    return tls_pb2.CommonTlsContext(
        tls_params=_tls_params(),
        alpn_protocols=["h2"],
        tls_certificate_sds_secret_configs=[sds_secret_config(cert_secret)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=peer, validation_context_sds_secret_config=sds_secret_config(trust_secret)))


def _http2() -> protocol_pb2.Http2ProtocolOptions:
    return protocol_pb2.Http2ProtocolOptions(
        allow_connect=True,
        initial_stream_window_size=_u32(STREAM_WINDOW),
        initial_connection_window_size=_u32(CONNECTION_WINDOW),
        connection_keepalive=protocol_pb2.KeepaliveSettings(interval=duration(PING_INTERVAL_S),
                                                            timeout=duration(PING_TIMEOUT_S)))


def _u32(v: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=v)


# ---- outbound: capture listener and origination cluster ------------------------------------------


def capture_listener(name: str, netns: str, cluster: str, source_ip: str, baggage: str = "",
                     access_log: Sequence[accesslog_pb2.AccessLog] = ()) -> listener_pb2.Listener:
    """The pod's outbound capture listener (inside its namespace). The CONNECT carries, as ztunnel's
    does, `forwarded: for="<pod ip>:<app port>"` and `baggage` (k8s.namespace.name=..., service.name=...,
    see `baggage`); the source identity itself travels in the certificate only."""
    headers = [("forwarded", f'for="{_host(source_ip)}:%DOWNSTREAM_REMOTE_PORT%"')]
    if baggage:
        headers.append(("baggage", baggage))
    tcp = tcp_proxy_pb2.TcpProxy(
        stat_prefix=name.replace("|", "_"),
        cluster=cluster,
        tunneling_config=tcp_proxy_pb2.TcpProxy.TunnelingConfig(
            hostname="%DOWNSTREAM_LOCAL_ADDRESS%",  # the original ip:port, restored by original_dst
            headers_to_add=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
                            for k, v in headers]),
        access_log=list(access_log),
    )
    if access_log:  # also log when the upstream connected: the tunnel's "open" flow
        tcp.access_log_options.CopyFrom(tcp_proxy_log_options())
    listener = listener_pb2.Listener(
        name=name,
        traffic_direction=base_pb2.OUTBOUND,
        listener_filters=[listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.original_dst", typed_config=pack(original_dst_pb2.OriginalDst()))],
        filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name="envoy.filters.network.tcp_proxy", typed_config=pack(tcp))])],
    )
    _addresses(listener, ["127.0.0.1", "::1"], CAPTURE_PORT, netns)
    return listener


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip  # RFC 7239 and :authority: IPv6 in brackets


def baggage(namespace: str, workload: str, workload_type: str = "pod", service: str = "", version: str = "",
            cluster: str = "Kubernetes") -> str:
    """The W3C baggage ztunnel sends with each CONNECT, naming the source workload."""
    items = [("k8s.cluster.name", cluster), ("k8s.namespace.name", namespace), (f"k8s.{workload_type}.name", workload),
             ("service.name", service), ("service.version", version)]
    return ",".join(f"{k}={v}" for k, v in items if v)


def origination_cluster(name: str, cert_secret: str, trust_secret: str, trust_domain: str,
                        connect_timeout_s: float = 5.0) -> cluster_pb2.Cluster:
    """HBONE to wherever the connection was going, port 15008, as the identity of `cert_secret`.
    Envoy pools tunnels per destination (pod address) within this cluster, so per (source identity,
    destination)."""
    http = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=_http2()))
    upstream_tls = tls_pb2.UpstreamTlsContext(common_tls_context=_common_tls(cert_secret, trust_secret, trust_domain))
    c = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration(connect_timeout_s),
        cleanup_interval=duration(60),
        original_dst_lb_config=cluster_pb2.Cluster.OriginalDstLbConfig(upstream_port_override=_u32(HBONE_PORT)),
    )
    c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(pack(http))
    c.transport_socket.name = "envoy.transport_sockets.tls"
    c.transport_socket.typed_config.CopyFrom(pack(upstream_tls))
    return c


# ---- inbound: HBONE termination ---------------------------------------------------------------------


def delivery_cluster(name: str, connect_timeout_s: float = 5.0) -> cluster_pb2.Cluster:
    """Connects a terminated CONNECT stream to its `:authority` (already checked to be the pod's)."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration(connect_timeout_s),
        cleanup_interval=duration(60),
        original_dst_lb_config=cluster_pb2.Cluster.OriginalDstLbConfig(use_http_header=True,
                                                                       http_header_name=":authority"),
    )


def _authority_domains(ips: Sequence[str]) -> list[str]:
    return [f"{_host(ip)}:*" for ip in ips]


def _bad_request() -> route_components_pb2.DirectResponseAction:
    return route_components_pb2.DirectResponseAction(status=400)


def inbound_routes(name: str, pod_ips: Sequence[str], delivery: str,
                   rbac: http_rbac_pb2.RBAC | None = None) -> route_pb2.RouteConfiguration:
    """The HBONE listener's routes (by RDS, named like the listener): a CONNECT to one of the pod's own
    addresses is delivered (200 once the upstream connected, 503 if it could not); anything else is 400.
    The pod's policy rides on the CONNECT route (`rbac`): a route update reaches new streams and leaves open
    tunnels alone, where a listener update would drain every tunnel of the pod (revocation of the ones a
    change no longer allows is the agent's: it closes their sockets)."""
    connect = route_components_pb2.Route(
        name="connect",
        match=route_components_pb2.RouteMatch(connect_matcher=route_components_pb2.RouteMatch.ConnectMatcher()),
        route=route_components_pb2.RouteAction(cluster=delivery, upgrade_configs=[
            route_components_pb2.RouteAction.UpgradeConfig(
                upgrade_type="CONNECT",
                connect_config=route_components_pb2.RouteAction.UpgradeConfig.ConnectConfig())]))
    if rbac is not None:
        connect.typed_per_filter_config[RBAC_FILTER].CopyFrom(pack(http_rbac_pb2.RBACPerRoute(rbac=rbac)))
    pod_routes = route_components_pb2.VirtualHost(name="pod", domains=_authority_domains(pod_ips), routes=[
        connect,
        route_components_pb2.Route(name="not_connect", match=route_components_pb2.RouteMatch(prefix="/"),
                                   direct_response=_bad_request()),
    ])
    elsewhere = route_components_pb2.VirtualHost(name="not_this_pod", domains=["*"], routes=[
        route_components_pb2.Route(
            name="connect_elsewhere",
            match=route_components_pb2.RouteMatch(connect_matcher=route_components_pb2.RouteMatch.ConnectMatcher()),
            direct_response=_bad_request()),
        route_components_pb2.Route(name="not_connect", match=route_components_pb2.RouteMatch(prefix="/"),
                                   direct_response=_bad_request()),
    ])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[pod_routes, elsewhere])


RBAC_FILTER = "envoy.filters.http.rbac"


def inbound_listener(name: str, pod_ips: Sequence[str], netns: str, cert_secret: str, trust_secret: str,
                     trust_domain: str, access_log: Sequence[accesslog_pb2.AccessLog] = ()) -> listener_pb2.Listener:
    """The pod's HBONE listener: podIP:15008 inside its namespace, mTLS with the pod's SVID, HTTP/2 CONNECT,
    routes by RDS (`inbound_routes`, same name). A policy deny (the RBAC filter, configured per route) is
    answered 401, as ztunnel answers it."""
    filters = [
        hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=pack(http_rbac_pb2.RBAC())),  # the routes say who passes
        hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())),
    ]
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name.replace("|", "_"),
        codec_type=hcm_pb2.HttpConnectionManager.HTTP2,
        http2_protocol_options=_http2(),
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="CONNECT")],
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=name),
        http_filters=filters,
        request_headers_timeout=duration(HANDSHAKE_TIMEOUT_S),
        local_reply_config=hcm_pb2.LocalReplyConfig(mappers=[hcm_pb2.ResponseMapper(
            # The RBAC filter answers 403 (the only 403 Envoy makes itself here); HBONE peers expect 401.
            filter=accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
                comparison=accesslog_pb2.ComparisonFilter(op=accesslog_pb2.ComparisonFilter.EQ, value=base_pb2.RuntimeUInt32(
                    default_value=403, runtime_key="meshaccel.hbone.rbac_status")))),
            status_code=_u32(401))]),
        access_log=list(access_log),
    )
    if access_log:  # also log when the CONNECT got its 200: the tunnel's "open" flow
        hcm.access_log_options.flush_log_on_tunnel_successfully_established = True
    downstream_tls = tls_pb2.DownstreamTlsContext(
        common_tls_context=_common_tls(cert_secret, trust_secret, trust_domain),
        require_client_certificate=wrappers_pb2.BoolValue(value=True))
    chain = listener_components_pb2.FilterChain(
        # Only TLS offering h2 gets a filter chain: no ALPN, or another protocol, is closed at once.
        filter_chain_match=listener_components_pb2.FilterChainMatch(transport_protocol="tls",
                                                                   application_protocols=["h2"]),
        transport_socket_connect_timeout=duration(HANDSHAKE_TIMEOUT_S),
        filters=[listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager",
                                                typed_config=pack(hcm))])
    chain.transport_socket.name = "envoy.transport_sockets.tls"
    chain.transport_socket.typed_config.CopyFrom(pack(downstream_tls))
    listener = listener_pb2.Listener(
        name=name,
        traffic_direction=base_pb2.INBOUND,
        listener_filters=[listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.tls_inspector", typed_config=pack(tls_inspector_pb2.TlsInspector()))],
        listener_filters_timeout=duration(HANDSHAKE_TIMEOUT_S),
        filter_chains=[chain],
    )
    _addresses(listener, list(pod_ips), HBONE_PORT, netns)
    return listener



# ---- policy on the HBONE inbound: Envoy RBAC over the tunnel's principal and target port ----------------


@dataclass(frozen=True, slots=True)
class PortRule:
    """TCP ports lo..hi of the pod behind the listener: every client principal gets `default_allow`, except
    those in `exceptions`, which get the opposite."""

    lo: int
    hi: int
    default_allow: bool
    exceptions: tuple[str, ...] = ()


def port_range_regex(lo: int, hi: int) -> str:
    """An RE2 alternation matching exactly the decimal numbers lo..hi (no leading zeros)."""
    def same_length(a: str, b: str) -> list[str]:
        if a == b:
            return [a]
        if len(a) == 1:
            return [f"[{a}-{b}]"]
        if a[0] == b[0]:
            return [a[0] + p for p in same_length(a[1:], b[1:])]
        n = len(a) - 1
        out: list[str] = []
        first, last = int(a[0]), int(b[0])
        if a[1:] != "0" * n:  # a's leading digit, from a's tail up
            out += [a[0] + p for p in same_length(a[1:], "9" * n)]
            first += 1
        full_last = b[1:] == "9" * n
        if not full_last:
            last -= 1
        if first <= last:  # whole decades in between
            digit = str(first) if first == last else f"[{first}-{last}]"
            out.append(digit + "[0-9]" * n)
        if not full_last:
            out += [b[0] + p for p in same_length("0" * n, b[1:])]
        return out

    parts: list[str] = []
    while lo <= hi:
        top = min(hi, 10 ** len(str(lo)) - 1)  # numbers of lo's length
        parts += same_length(str(lo), str(top))
        lo = top + 1
    return "|".join(parts)


def _authority_port(lo: int, hi: int) -> rbac_pb2.Permission:
    """The CONNECT target's port (`:authority` is ip:port or [ip]:port) in lo..hi."""
    regex = f"^.*:(?:{port_range_regex(lo, hi)})$"
    return rbac_pb2.Permission(header=route_components_pb2.HeaderMatcher(
        name=":authority", string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex))))


def _principal(spiffe_id: str) -> rbac_pb2.Principal:
    """The client certificate's URI SAN (the tunnel's only source of identity)."""
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(
        principal_name=string_pb2.StringMatcher(exact=spiffe_id)))


def connect_rbac(rules: Sequence[PortRule]) -> http_rbac_pb2.RBAC:
    """An allow-list RBAC for the HBONE listener's HTTP filter chain: a CONNECT passes when a rule's port
    range holds its target port and the rule allows its client principal; anything else is denied (403,
    which the listener answers as 401). `rules` must cover every port (ports no rule names are denied)."""
    policies: dict[str, rbac_pb2.Policy] = {}
    for r in rules:
        exceptions = [_principal(p) for p in sorted(r.exceptions)]
        if r.default_allow:
            principals = [rbac_pb2.Principal(any=True)] if not exceptions else [rbac_pb2.Principal(
                not_id=rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=exceptions)))]
        elif exceptions:
            principals = exceptions
        else:
            continue  # nobody on these ports
        policies[f"ports-{r.lo}-{r.hi}"] = rbac_pb2.Policy(permissions=[_authority_port(r.lo, r.hi)],
                                                            principals=principals)
    return http_rbac_pb2.RBAC(rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies=policies))
