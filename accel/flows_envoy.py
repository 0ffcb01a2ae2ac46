"""Envoy's access log entries (from the ALS server, `meshxds/als.py`) as flows.

What an entry is comes from the custom tags `meshxds/access_log.py` puts on each access log
(`meshaccel.path`, `.direction`, `.service`); without them an HTTP entry is an L7 request and a TCP
entry is a tunnel when its downstream was TLS, else plain TCP.

- L7 request (HTTP entry): source = the downstream peer, destination = the upstream host Envoy
  picked; method, path, status, route name, response flags; bytes = headers + body each way.
- Tunnel (TCP or HTTP CONNECT entry, encrypted): identities from the certificates: the downstream
  peer's URI SAN is the source (inbound; its pod is the one an HBONE CONNECT's `forwarded: for=` names
  when that pod has that identity, else the peer node's address), Envoy's own certificate on that
  connection the destination; on an outbound tunnel the upstream peer's URI SAN (tag `meshaccel.upstream_peer`)
  is the destination. Bytes from the connection properties.
- A TCP entry logged when the upstream connected is an `open` flow, at connection end a `close`
  flow; a connection that never reached an upstream (no healthy upstream, connection failure, no
  route, RBAC deny) is `refused` (verdict `denied` for RBAC).
Periodic (intermediate) entries are skipped. An entry that cannot be read (no IP address on either
side, an out-of-range port or status) is counted as malformed and skipped; the rest of its
message still counts.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2

from accel.flows import Endpoint, Flow, FlowStore
from accel.flows_resolve import EndpointResolver
from meshxds.access_log import TAG_DESTINATION, TAG_PATH, TAG_SERVICE, TAG_SOURCE_IP, TAG_UPSTREAM_PEER
from meshxds.als import StreamIdentity

log = logging.getLogger(__name__)

# Envoy's short response flag names, in its order (what %RESPONSE_FLAGS% prints).
_FLAG_NAMES = (
    ("failed_local_healthcheck", "LH"), ("no_healthy_upstream", "UH"), ("upstream_request_timeout", "UT"),
    ("local_reset", "LR"), ("upstream_remote_reset", "UR"), ("upstream_connection_failure", "UF"),
    ("upstream_connection_termination", "UC"), ("upstream_overflow", "UO"), ("no_route_found", "NR"),
    ("delay_injected", "DI"), ("fault_injected", "FI"), ("rate_limited", "RL"),
    ("rate_limit_service_error", "RLSE"), ("downstream_connection_termination", "DC"),
    ("upstream_retry_limit_exceeded", "URX"), ("stream_idle_timeout", "SI"),
    ("invalid_envoy_request_headers", "IH"), ("downstream_protocol_error", "DPE"),
    ("upstream_max_stream_duration_reached", "UMSDR"), ("response_from_cache_filter", "RFCF"),
    ("no_filter_config_found", "NFCF"), ("duration_timeout", "DT"), ("upstream_protocol_error", "UPE"),
    ("no_cluster_found", "NC"), ("overload_manager", "OM"), ("dns_resolution_failure", "DF"),
    ("downstream_remote_reset", "DR"),
)
# Flags that mean the connection never reached a destination, and the reason a flow gives.
_REFUSED = {"UH": "no_backend", "NC": "no_service", "NR": "no_route", "UF": "upstream_failed",
            "UO": "upstream_overflow", "URX": "upstream_failed"}
_PERIODIC = frozenset({al.TcpPeriodic, al.DownstreamPeriodic, al.UpstreamPeriodic, al.UdpPeriodic})


class MalformedEntry(ValueError):
    pass


_SHORT = {name: short for name, short in _FLAG_NAMES} | {"unauthorized_details": "UAEX"}
_ORDER = {name: i for i, name in enumerate(_SHORT)}


def response_flags(flags: al.ResponseFlags) -> str:
    """Envoy's short names joined by ',' ("-" when none), as %RESPONSE_FLAGS% prints them."""
    set_ = [f.name for f, v in flags.ListFields() if v and f.name in _SHORT]  # only the fields that are set
    return ",".join(_SHORT[n] for n in sorted(set_, key=_ORDER.__getitem__)) or "-"


_canonical_ips: dict[str, str] = {}


def _canonical_ip(text: str) -> str:
    """The canonical text of an IP address (as the model keeps them); MalformedEntry if it is none."""
    ip = _canonical_ips.get(text)
    if ip is None:
        try:
            ip = str(ipaddress.ip_address(text))
        except ValueError:
            raise MalformedEntry(f"address {text!r} is not an IP address") from None
        if len(_canonical_ips) > 65536:  # addresses churn slowly; start over rather than grow
            _canonical_ips.clear()
        _canonical_ips[text] = ip
    return ip


def address_of(addr: address_pb2.Address) -> tuple[str, int] | None:
    """(ip, port) of an access log entry's socket address; None when unset or not an IP socket (a pipe);
    MalformedEntry when it is not an IP address or the port is out of range."""
    if not addr.HasField("socket_address"):
        return None
    sa = addr.socket_address
    if sa.port_value > 65535:
        raise MalformedEntry(f"port {sa.port_value} out of range")
    return _canonical_ip(sa.address), sa.port_value


def uri_san(cert: al.TLSProperties.CertificateProperties) -> str:
    for san in cert.subject_alt_name:
        if san.uri:
            return san.uri
    return ""


def _times(c: al.AccessLogCommon) -> tuple[float, float]:
    """(end time in unix seconds, duration in seconds)."""
    start = c.start_time.ToNanoseconds() / 1e9 if c.HasField("start_time") else 0.0
    if c.HasField("duration"):
        dur = c.duration.ToNanoseconds() / 1e9
    elif c.HasField("time_to_last_downstream_tx_byte"):
        dur = c.time_to_last_downstream_tx_byte.ToNanoseconds() / 1e9
    else:
        dur = 0.0
    return (start + dur if start else time.time()), max(0.0, dur)


def _periodic(c: al.AccessLogCommon) -> bool:
    """A periodic report of a connection still going on (counted at its end instead). Envoy also
    marks the upstream-connected entry intermediate, so the type decides when it is set."""
    if c.access_log_type != al.NotSet:
        return c.access_log_type in _PERIODIC
    return c.intermediate_log_entry


def _verdict(flags: str, details: str, event: str) -> tuple[str, str, str, str]:
    """(event, verdict, reason, policy) from the flags and termination/response details."""
    if details.startswith("rbac_access_denied"):
        policy = details.partition("[")[2].rstrip("]") if "[" in details else ""
        return ("refused" if event == "close" else event), "denied", "policy", policy
    for f in flags.split(","):
        if f in _REFUSED:
            return ("refused" if event == "close" else event), "refused", _REFUSED[f], ""
    return event, "forwarded", "", ""


class EnvoyFlows:
    """The ALS server's `on_message`: decodes entries into flows and appends each message's flows
    to the store in one batch. Counters are read by the agent's metrics and status."""

    def __init__(self, store: FlowStore, resolver: EndpointResolver,
                 on_problem: Callable[[str, str], None] | None = None) -> None:
        self.store = store
        self.resolver = resolver
        self.on_problem = on_problem
        self._lock = threading.Lock()
        self.flows = 0
        self.malformed = 0
        self.skipped = 0

    def on_message(self, ident: StreamIdentity, msg: als_pb2.StreamAccessLogsMessage) -> None:
        flows: list[Flow] = []
        malformed = skipped = 0
        entries: list[tuple[Callable[..., Flow | None], object]] = [
            *((self.http_flow, e) for e in msg.http_logs.log_entry),
            *((self.tcp_flow, e) for e in msg.tcp_logs.log_entry)]
        for decode, entry in entries:
            try:
                f = decode(entry)
            except MalformedEntry as e:
                malformed += 1
                if self.on_problem is not None:
                    self.on_problem("access_log_malformed", f"node={ident.node_id or '-'} log={ident.log_name or '-'} "
                                                            f"skipped an access log entry: {e}")
                continue
            if f is None:
                skipped += 1
            else:
                flows.append(f)
        with self._lock:
            self.flows += len(flows)
            self.malformed += malformed
            self.skipped += skipped
        self.store.extend(flows)

    # --- one entry ----------------------------------------------------------------------------
    def _ends(self, c: al.AccessLogCommon, tags: Mapping[str, str]) -> tuple[Endpoint, Endpoint, str]:
        """(source, destination, service) endpoints of an entry."""
        down = address_of(c.downstream_remote_address)
        if down is None:
            raise MalformedEntry("no downstream IP address")
        if tags.get(TAG_SOURCE_IP):  # a capture leg: the downstream is the pod's loopback
            down = (_canonical_ip(tags[TAG_SOURCE_IP]), down[1])
        up = address_of(c.upstream_remote_address)
        if tags.get(TAG_DESTINATION) == "original":  # where the app was going, not the HBONE hop
            up = None
        local = address_of(c.downstream_local_address) if up is None else None
        target = up or local
        if target is None:
            raise MalformedEntry("no upstream or local IP address")
        src = self.resolver.endpoint(*down)
        dst = self.resolver.endpoint(*target)
        service = tags.get(TAG_SERVICE, "")
        if not service and up is None and local is not None:
            service = self.resolver.service_at(*local)
        return src, dst, service

    def _identities(self, c: al.AccessLogCommon, tags: Mapping[str, str], src: Endpoint,
                    dst: Endpoint) -> tuple[Endpoint, Endpoint, bool]:
        """Identities from certificates override what the address said (the certificate is proof)."""
        tls = c.tls_properties
        encrypted = bool(tls.tls_version) or bool(tags.get(TAG_UPSTREAM_PEER))
        peer = uri_san(tls.peer_certificate_properties)
        own = uri_san(tls.local_certificate_properties)
        upstream = tags.get(TAG_UPSTREAM_PEER, "")
        if upstream == "-":
            upstream = ""
        if peer and peer != src.identity:
            src = _with_identity(src, peer)
        dst_id = upstream or own
        if dst_id and dst_id != dst.identity:
            dst = _with_identity(dst, dst_id)
        return src, dst, encrypted

    def tcp_flow(self, entry: al.TCPAccessLogEntry) -> Flow | None:
        c = entry.common_properties
        if _periodic(c):
            return None
        tags = dict(c.custom_tags)
        src, dst, service = self._ends(c, tags)
        src, dst, encrypted = self._identities(c, tags, src, dst)
        flags = response_flags(c.response_flags)
        opened = c.access_log_type == al.TcpUpstreamConnected
        event, verdict, reason, policy = _verdict(flags, c.connection_termination_details,
                                                  "open" if opened else "close")
        if c.downstream_transport_failure_reason and verdict == "forwarded":
            # e.g. plaintext, or a certificate the trust bundle does not sign, to an mTLS listener
            event, verdict, reason = "refused", "denied", "tls_handshake_failed"
        end, dur = _times(c)
        path = tags.get(TAG_PATH) or ("tunnel" if encrypted else "tcp")
        closed = event != "open"
        return Flow(time=end if closed else end - dur, event=event, source="envoy", proto="TCP", src=src, dst=dst, path=path,
                    encrypted=encrypted, verdict=verdict, reason=reason, policy=policy, service=service,
                    bytes_sent=entry.connection_properties.received_bytes if closed else 0,
                    bytes_received=entry.connection_properties.sent_bytes if closed else 0,
                    duration_seconds=dur if closed else 0.0, response_flags=flags)

    def http_flow(self, entry: al.HTTPAccessLogEntry) -> Flow | None:
        c = entry.common_properties
        if _periodic(c):
            return None
        tags = dict(c.custom_tags)
        src, dst, service = self._ends(c, tags)
        src, dst, encrypted = self._identities(c, tags, src, dst)
        if encrypted and entry.request.request_method == base_pb2.CONNECT:  # an HBONE stream, not a request
            src = self._forwarded_source(entry.request, src)
        status = entry.response.response_code.value
        if status > 999:
            raise MalformedEntry(f"HTTP status {status} out of range")
        flags = response_flags(c.response_flags)
        req, resp = entry.request, entry.response
        path = tags.get(TAG_PATH) or "l7"
        tunnel_open = c.access_log_type == al.DownstreamTunnelSuccessfullyEstablished
        event, verdict, reason, policy = _verdict(flags, resp.response_code_details, "open" if tunnel_open else "close")
        if path == "l7":
            event = "open" if tunnel_open else "close"  # a request happened, whatever its outcome
        elif req.request_method == base_pb2.CONNECT and status >= 400 and verdict == "forwarded":
            # HBONE answers 400 (bad destination), 401 (policy deny), 503 (upstream failed)
            event, verdict, reason = "refused", ("denied" if status in (401, 403) else "refused"), f"tunnel_{status}"
        end, dur = _times(c)
        try:
            method = base_pb2.RequestMethod.Name(req.request_method) if req.request_method else ""
        except ValueError:
            raise MalformedEntry(f"unknown request method {req.request_method}") from None
        closed = event != "open"  # bytes and duration are a closed flow's, as for TCP entries
        return Flow(time=end if closed else end - dur, event=event, source="envoy", proto="TCP", src=src, dst=dst,
                    path=path, encrypted=encrypted, verdict=verdict, reason=reason, policy=policy, service=service,
                    bytes_sent=req.request_headers_bytes + req.request_body_bytes if closed else 0,
                    bytes_received=resp.response_headers_bytes + resp.response_body_bytes if closed else 0,
                    duration_seconds=dur if closed else 0.0, http_method=method,
                    http_path=req.path, http_status=status, route=c.route_name, response_flags=flags)

    def _forwarded_source(self, req: al.HTTPRequestProperties, src: Endpoint) -> Endpoint:
        """An HBONE CONNECT comes from the peer node's address; its `forwarded: for="ip:port"` names the
        source pod. Believed only when the model's pod at that address has the certificate's identity
        (the peer writes the header, the CA vouches for the identity); otherwise the node stays the source."""
        fwd = req.request_headers.get("forwarded", "")
        if not fwd or not src.identity:
            return src
        named = forwarded_for(fwd)
        if named is None:
            return src
        pod = self.resolver.endpoint(*named)
        return pod if pod.pod and pod.identity == src.identity else src

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"flows": self.flows, "malformed_entries": self.malformed, "skipped_entries": self.skipped}


def forwarded_for(header: str) -> tuple[str, int] | None:
    """(ip, port) of the first `for=` of a Forwarded header (RFC 7239): `for="10.0.0.5:4000"`,
    `for="[fd00::5]:4000"`, `for=10.0.0.5` (port 0); None when there is no IP address there."""
    for part in header.split(",")[0].split(";"):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() != "for":
            continue
        value = value.strip().strip('"')
        if value.startswith("["):
            host, _, rest = value[1:].partition("]")
            port = rest.removeprefix(":")
        elif value.count(":") == 1:
            host, _, port = value.partition(":")
        else:
            host, port = value, ""
        try:
            ip = _canonical_ip(host)
        except MalformedEntry:
            return None
        return ip, int(port) if port.isdigit() and int(port) <= 65535 else 0
    return None


def _with_identity(ep: Endpoint, identity: str) -> Endpoint:
    return Endpoint(ep.ip, ep.port, ep.pod, ep.workload, ep.namespace, identity, ep.labels)
