"""Small builders for the Envoy resources we serve: EDS clusters, load assignments, HTTP listeners
(optionally TLS with certificates over SDS), and route pieces. Every dynamic reference (EDS, RDS,
SDS) points back at ADS, so one stream carries everything."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, substitution_format_string_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2


def ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def pack(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def socket_address(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def eds_cluster(name: str, connect_timeout_s: float = 1.0) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.EDS, connect_timeout=duration(connect_timeout_s),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads()),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )


@dataclass(frozen=True, slots=True)
class Backend:
    ip: str
    port: int
    weight: int = 1


def load_assignment(cluster: str, backends: Iterable[Backend]) -> endpoint_pb2.ClusterLoadAssignment:
    lb = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=socket_address(b.ip, b.port)),
            load_balancing_weight=wrappers_pb2.UInt32Value(value=max(1, b.weight)),
        )
        for b in sorted(backends, key=lambda b: (b.ip, b.port))
    ]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb)] if lb else [],
    )


def sds_secret_config(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads())


def http_listener(name: str, ip: str, port: int, route_config: str,
                  tls_certificate: str = "", validation_context: str = "") -> listener_pb2.Listener:
    """An HTTP listener whose routes come by RDS; with `tls_certificate`, TLS from SDS secrets."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name.replace("/", "_").replace(":", "_"),
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=route_config),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))],
    )
    chain = listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
        name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))])
    if tls_certificate:
        common = tls_pb2.CommonTlsContext(tls_certificate_sds_secret_configs=[sds_secret_config(tls_certificate)])
        if validation_context:
            common.validation_context_sds_secret_config.CopyFrom(sds_secret_config(validation_context))
        chain.transport_socket.name = "envoy.transport_sockets.tls"
        chain.transport_socket.typed_config.CopyFrom(pack(tls_pb2.DownstreamTlsContext(common_tls_context=common)))
    return listener_pb2.Listener(name=name, address=socket_address(ip, port), filter_chains=[chain])


# What the mesh listeners log per connection or tunnel (Envoy's format operators).
MESH_LOG_FIELDS = {
    "start_time": "%START_TIME%",
    "listener": "%ACCESS_LOG_TYPE%",
    "downstream_peer": "%DOWNSTREAM_PEER_URI_SAN%",  # the client's SPIFFE ID on an inbound tunnel
    "upstream_peer": "%UPSTREAM_PEER_URI_SAN%",  # the server's SPIFFE ID on an outbound tunnel
    "downstream_remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "downstream_local": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "upstream_host": "%UPSTREAM_HOST%",
    "authority": "%REQ(:AUTHORITY)%",
    "forwarded": "%REQ(FORWARDED)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "route": "%ROUTE_NAME%",
}


def file_access_log(path: str, fields: Mapping[str, str] = MESH_LOG_FIELDS) -> accesslog_pb2.AccessLog:
    """One JSON object per line into `path`."""
    fmt = struct_pb2.Struct()
    fmt.update(dict(fields))
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.file", typed_config=pack(file_pb2.FileAccessLog(
        path=path, log_format=substitution_format_string_pb2.SubstitutionFormatString(json_format=fmt))))


def string_match(kind: str, value: str) -> string_pb2.StringMatcher:
    """kind: Exact | RegularExpression (Gateway API match types)."""
    if kind == "RegularExpression":
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=value))
    return string_pb2.StringMatcher(exact=value)


def route_match(path_type: str = "PathPrefix", path: str = "/",
                headers: Sequence[tuple[str, str, str]] = ()) -> route_components_pb2.RouteMatch:
    """headers: (match type, name, value)."""
    m = route_components_pb2.RouteMatch()
    if path_type == "Exact":
        m.path = path
    elif path_type == "RegularExpression":
        m.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=path))
    elif path.rstrip("/"):
        # Gateway API prefixes match whole path elements: "/a" matches "/a" and "/a/b", not "/ab".
        m.path_separated_prefix = path.rstrip("/")
    else:
        m.prefix = "/"
    for kind, name, value in headers:
        m.headers.append(route_components_pb2.HeaderMatcher(name=name, string_match=string_match(kind, value)))
    return m


def retry_policy(attempts: int, codes: Sequence[int] = (), backoff_s: float | None = None,
                 per_try_timeout_s: float | None = None) -> route_components_pb2.RetryPolicy:
    p = route_components_pb2.RetryPolicy(
        retry_on="retriable-status-codes,connect-failure,reset" if codes else "5xx,connect-failure,reset",
        num_retries=wrappers_pb2.UInt32Value(value=attempts),
        retriable_status_codes=list(codes),
        # Retry on another endpoint than the one that just failed.
        retry_host_predicate=[route_components_pb2.RetryPolicy.RetryHostPredicate(
            name="envoy.retry_host_predicates.previous_hosts",
            typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()))],
        host_selection_retry_max_attempts=5,
    )
    if backoff_s is not None and backoff_s > 0:
        p.retry_back_off.base_interval.CopyFrom(duration(backoff_s))
    if per_try_timeout_s is not None:
        p.per_try_timeout.CopyFrom(duration(per_try_timeout_s))
    return p


def route_action(clusters: Sequence[tuple[str, int]], timeout_s: float | None = None,
                 retry: route_components_pb2.RetryPolicy | None = None) -> route_components_pb2.RouteAction:
    """clusters: (name, weight); one cluster = a plain route, several = a weighted split."""
    a = route_components_pb2.RouteAction()
    if len(clusters) == 1:
        a.cluster = clusters[0][0]
    else:
        a.weighted_clusters.clusters.extend(
            route_components_pb2.WeightedCluster.ClusterWeight(name=n, weight=wrappers_pb2.UInt32Value(value=w))
            for n, w in clusters)
    if timeout_s is not None:
        a.timeout.CopyFrom(duration(timeout_s))
    if retry is not None:
        a.retry_policy.CopyFrom(retry)
    return a


def route_config(name: str, routes: Iterable[route_components_pb2.Route],
                 domains: Sequence[str] = ("*",)) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[
        route_components_pb2.VirtualHost(name=name, domains=list(domains), routes=list(routes))])


def tls_certificate_secret(name: str, cert_chain_pem: bytes, private_key_pem: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=_inline(cert_chain_pem), private_key=_inline(private_key_pem)))


def validation_context_secret(name: str, trust_bundle_pem: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=_inline(trust_bundle_pem)))


def _inline(data: bytes) -> base_pb2.DataSource:
    return base_pb2.DataSource(inline_bytes=data)
