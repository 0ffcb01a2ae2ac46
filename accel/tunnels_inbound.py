"""The HBONE streams this node's Envoy is delivering to local pods, and who is at their other end.

A tunnelled connection reaches the destination pod from the node Envoy's own address (the delivery leg),
so the pod's socket alone cannot say whose connection it is. Envoy's access log can: the inbound tunnel
log has an entry when a stream's upstream connected (`flush_log_on_tunnel_successfully_established`)
and one when the stream ended, each with the delivery leg's two ends (its local address is what the pod
sees as its peer; the kernel shares that port among legs to different destinations, so a leg is known by
both ends) and the client certificate's URI SAN. The Revoker (accel/policy_agent.py) looks delivery legs up here and
judges them by the peer's principal, as the inbound RBAC judges a new stream; so this node closes a
tunnelled connection its policy no longer allows even when the source side cannot (its agent is down, or
the peer is not meshaccel: an Istio node proxy or waypoint).

Fed by the ALS server's messages (`on_message`, any thread). Bounded: when a stream's end entry never
comes (Envoy restarted, an entry lost), the oldest entries go first. An agent that restarts starts empty:
streams opened before it are judged only by their source's node.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable
from dataclasses import dataclass

from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2

from accel.flows_envoy import MalformedEntry, address_of, uri_san
from meshxds.access_log import TAG_DIRECTION, TAG_PATH
from meshxds.als import StreamIdentity

DEFAULT_CAPACITY = 65536


@dataclass(frozen=True, slots=True)
class InboundTunnel:
    principal: str  # the peer's SPIFFE ID (client certificate URI SAN)
    pod_ip: str  # where Envoy delivers: the destination pod's address and port
    port: int


class InboundTunnels:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        # (leg ip, leg port, pod ip, pod port) -> the stream; insertion order: oldest first
        self._open: dict[tuple[str, int, str, int], InboundTunnel] = {}
        self._lock = threading.Lock()
        self.opened = 0
        self.evicted = 0
        # Called (outside the lock) for each stream that opened: the agent checks it against the policy
        # now, for a stream that opened under a policy the Revoker has already applied.
        self.on_open: Callable[[InboundTunnel], None] = lambda _t: None

    def on_message(self, _ident: StreamIdentity, msg: als_pb2.StreamAccessLogsMessage) -> None:
        opened = []
        with self._lock:
            for e in msg.http_logs.log_entry:
                c = e.common_properties
                tags = c.custom_tags
                if tags.get(TAG_PATH) != "tunnel" or tags.get(TAG_DIRECTION) != "inbound":
                    continue
                try:
                    leg, dst = address_of(c.upstream_local_address), address_of(c.upstream_remote_address)
                except MalformedEntry:
                    continue  # the flows count it (accel/flows_envoy.py reads the same entry)
                if leg is None or dst is None:
                    continue  # the stream never reached the pod (refused, or the pod did not answer)
                key = (*leg, *dst)
                if c.access_log_type == al.DownstreamTunnelSuccessfullyEstablished:
                    principal = uri_san(c.tls_properties.peer_certificate_properties)
                    if not principal:
                        continue
                    t = InboundTunnel(principal, *dst)
                    self._open.pop(key, None)  # the same four ends again: the newest stream is the one
                    self._open[key] = t
                    self.opened += 1
                    opened.append(t)
                    while len(self._open) > self.capacity:
                        del self._open[next(iter(self._open))]
                        self.evicted += 1
                elif c.access_log_type == al.DownstreamEnd or (c.access_log_type == al.NotSet and not c.intermediate_log_entry):
                    self._open.pop(key, None)
        for t in opened:
            self.on_open(t)

    def peer(self, ip: str, port: int, pod_ip: str, pod_port: int) -> InboundTunnel | None:
        """The stream delivered to pod_ip:pod_port from ip:port (the pod's peer), if one is open."""
        key = (ipaddress.ip_address(ip).compressed, port, ipaddress.ip_address(pod_ip).compressed, pod_port)
        with self._lock:
            return self._open.get(key)

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"open": len(self._open), "opened": self.opened, "evicted": self.evicted}
