"""Envoy config that streams access logs to the agent's gRPC Access Log Service (ALS): the
`access_log` entries for an HTTP connection manager or a TCP proxy, and the static cluster they
name (the agent's ALS socket). The lead's listeners attach them; `meshxds/als.py` is the receiving end.

Each entry carries custom tags that say what the listener is for, since an access log entry does not
name its listener: `meshaccel.path` ("tunnel", "l7", ...), `meshaccel.direction` ("inbound",
"outbound"), `meshaccel.service` ("namespace/name" of an L7 service). `meshaccel.upstream_peer` is the
upstream TLS peer's URI SAN (Envoy's `%UPSTREAM_PEER_URI_SAN%`), the destination identity of an
outbound tunnel: the entry itself only carries the downstream connection's TLS properties.

Entries are batched by Envoy and flushed every `flush_interval_s` or when `buffer_bytes` fill up.
TCP proxies log on close; with `tcp_proxy_log_options()` they also log when the upstream connects
(an "open" flow).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.tracing.v3 import custom_tag_pb2

from meshxds.resources import duration, pack

DEFAULT_CLUSTER = "meshaccel_als"
HTTP_LOGGER = "envoy.access_loggers.http_grpc"
TCP_LOGGER = "envoy.access_loggers.tcp_grpc"

# Custom tag names: how the agent learns what an entry's listener was for.
TAG_PATH = "meshaccel.path"
TAG_DIRECTION = "meshaccel.direction"
TAG_SERVICE = "meshaccel.service"
TAG_UPSTREAM_PEER = "meshaccel.upstream_peer"
TAG_SOURCE_IP = "meshaccel.source_ip"  # the source's address when the downstream is loopback (a capture leg)
TAG_DESTINATION = "meshaccel.destination"  # "original": the destination is the downstream local address


def als_cluster(address: str, name: str = DEFAULT_CLUSTER, connect_timeout_s: float = 1.0) -> cluster_pb2.Cluster:
    """A STATIC HTTP/2 cluster to the agent's ALS server. `address`: "unix:/path" or "HOST:PORT"."""
    if address.startswith("unix:"):
        addr = address_pb2.Address(pipe=address_pb2.Pipe(path=address.removeprefix("unix:")))
    else:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"ALS address {address!r} is not HOST:PORT or unix:PATH")
        addr = address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host.strip("[]"),
                                                                              port_value=int(port)))
    h2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))
    return cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.STATIC, connect_timeout=duration(connect_timeout_s),
        typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": pack(h2)},
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=addr))])]),
    )


def _common(log_name: str, cluster: str, tags: Mapping[str, str], upstream_peer: bool,
            flush_interval_s: float, buffer_bytes: int) -> als_pb2.CommonGrpcAccessLogConfig:
    custom = [custom_tag_pb2.CustomTag(tag=k, literal=custom_tag_pb2.CustomTag.Literal(value=v))
              for k, v in sorted(tags.items()) if v]
    if upstream_peer:
        custom.append(custom_tag_pb2.CustomTag(tag=TAG_UPSTREAM_PEER, value="%UPSTREAM_PEER_URI_SAN%"))
    common = als_pb2.CommonGrpcAccessLogConfig(
        log_name=log_name,
        grpc_service=grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
            cluster_name=cluster)),
        transport_api_version=config_source_pb2.V3,
        buffer_flush_interval=duration(flush_interval_s),
        custom_tags=custom,
    )
    common.buffer_size_bytes.value = buffer_bytes
    return common


def _tags(path: str, direction: str, service: str, source_ip: str = "", original_destination: bool = False
          ) -> dict[str, str]:
    return {TAG_PATH: path, TAG_DIRECTION: direction, TAG_SERVICE: service, TAG_SOURCE_IP: source_ip,
            TAG_DESTINATION: "original" if original_destination else ""}


def http_access_log(path: str, direction: str = "", service: str = "", *, cluster: str = DEFAULT_CLUSTER,
                    log_name: str = "meshaccel", upstream_peer: bool = False, flush_interval_s: float = 1.0,
                    buffer_bytes: int = 16384, request_headers: Sequence[str] = ()) -> accesslog_pb2.AccessLog:
    """For HttpConnectionManager.access_log: one entry per request (and per CONNECT tunnel).
    `request_headers`: also log these (e.g. an HBONE CONNECT's `forwarded`, naming the source pod)."""
    cfg = als_pb2.HttpGrpcAccessLogConfig(common_config=_common(
        log_name, cluster, _tags(path, direction, service), upstream_peer, flush_interval_s, buffer_bytes),
        additional_request_headers_to_log=list(request_headers))
    return accesslog_pb2.AccessLog(name=HTTP_LOGGER, typed_config=pack(cfg))


def tcp_access_log(path: str, direction: str = "", service: str = "", *, cluster: str = DEFAULT_CLUSTER,
                   log_name: str = "meshaccel", upstream_peer: bool = False, flush_interval_s: float = 1.0,
                   buffer_bytes: int = 16384, source_ip: str = "", original_destination: bool = False
                   ) -> accesslog_pb2.AccessLog:
    """For TcpProxy.access_log (or Listener.access_log): one entry per connection. `source_ip`: the source
    to report when the downstream is a loopback leg (a pod's capture listener); `original_destination`:
    report the downstream's local address (restored by original_dst) rather than the upstream host."""
    cfg = als_pb2.TcpGrpcAccessLogConfig(common_config=_common(
        log_name, cluster, _tags(path, direction, service, source_ip, original_destination), upstream_peer,
        flush_interval_s, buffer_bytes))
    return accesslog_pb2.AccessLog(name=TCP_LOGGER, typed_config=pack(cfg))


def tcp_proxy_log_options() -> tcp_proxy_pb2.TcpProxy.TcpAccessLogOptions:
    """For TcpProxy.access_log_options: also log when the upstream connects, so the agent sees the
    connection open (access_log_type TcpUpstreamConnected) as well as close (TcpConnectionEnd)."""
    return tcp_proxy_pb2.TcpProxy.TcpAccessLogOptions(flush_access_log_on_connected=True)


def attach(listener: listener_pb2.Listener, http: accesslog_pb2.AccessLog | None = None,
           tcp: accesslog_pb2.AccessLog | None = None) -> listener_pb2.Listener:
    """A copy of `listener` whose HTTP connection managers log with `http` and whose TCP proxies log
    with `tcp` (and also on upstream connect); other filters are left alone."""
    out = listener_pb2.Listener()
    out.CopyFrom(listener)
    chains = [*out.filter_chains, *([out.default_filter_chain] if out.HasField("default_filter_chain") else [])]
    for chain in chains:
        for f in chain.filters:
            if http is not None and f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                hcm.access_log.append(http)
                f.typed_config.Pack(hcm)
            elif tcp is not None and f.typed_config.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR):
                tp = tcp_proxy_pb2.TcpProxy()
                f.typed_config.Unpack(tp)
                tp.access_log.append(tcp)
                tp.access_log_options.CopyFrom(tcp_proxy_log_options())
                f.typed_config.Pack(tp)
    return out
