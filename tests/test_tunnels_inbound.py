"""Inbound tunnels from Envoy's access log (accel/tunnels_inbound.py), and the Revoker's check of a stream
that opened under a policy it had already applied. The end-to-end case (a destination node closing the
tunnelled connections its policy denies while the source node's agent is frozen) is in test_policy_lab.py."""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2

from accel.policy import PolicyCompiler
from accel.policy_agent import PolicyEnforcer, Revoker
from accel.state.model import Event, EventType
from accel.state.parse import parse_object
from accel.state.store import ClusterState
from accel.tunnels_inbound import InboundTunnel, InboundTunnels
from meshxds.access_log import TAG_DIRECTION, TAG_PATH
from meshxds.als import StreamIdentity
from tests.policy_cluster import authz, ns, pod

FE = "spiffe://cluster.local/ns/web/sa/fe"
IDENT = StreamIdentity(1, "node2", "meshaccel")


def addr(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def entry(kind: int, leg: tuple[str, int] | None, principal: str = FE, dst: tuple[str, int] = ("10.0.2.5", 5432),
          path: str = "tunnel", direction: str = "inbound") -> al.HTTPAccessLogEntry:
    c = al.AccessLogCommon(access_log_type=kind, upstream_remote_address=addr(*dst))
    c.custom_tags[TAG_PATH] = path
    c.custom_tags[TAG_DIRECTION] = direction
    if leg is not None:
        c.upstream_local_address.CopyFrom(addr(*leg))
    if principal:
        c.tls_properties.peer_certificate_properties.subject_alt_name.add(uri=principal)
    return al.HTTPAccessLogEntry(common_properties=c)


def message(*entries: al.HTTPAccessLogEntry) -> als_pb2.StreamAccessLogsMessage:
    msg = als_pb2.StreamAccessLogsMessage()
    msg.http_logs.log_entry.extend(entries)
    return msg


OPEN, END = al.DownstreamTunnelSuccessfullyEstablished, al.DownstreamEnd


def test_a_stream_is_known_by_its_delivery_leg_from_open_to_end() -> None:
    tunnels = InboundTunnels()
    seen: list[InboundTunnel] = []
    tunnels.on_open = seen.append
    # The kernel gives two legs to different destinations the same local port: both ends tell them apart.
    tunnels.on_message(IDENT, message(entry(OPEN, ("10.0.2.1", 40000)),
                                      entry(OPEN, ("10.0.2.1", 40000), "spiffe://x/y", dst=("10.0.2.5", 7000))))
    assert tunnels.peer("10.0.2.1", 40000, "10.0.2.5", 5432) == InboundTunnel(FE, "10.0.2.5", 5432)
    assert tunnels.peer("10.0.2.1", 40000, "10.0.2.5", 7000) == InboundTunnel("spiffe://x/y", "10.0.2.5", 7000)
    assert tunnels.peer("10.0.2.1", 40000, "10.0.2.6", 5432) is None
    assert seen == [InboundTunnel(FE, "10.0.2.5", 5432), InboundTunnel("spiffe://x/y", "10.0.2.5", 7000)]
    tunnels.on_message(IDENT, message(entry(END, ("10.0.2.1", 40000), dst=("10.0.2.5", 7000))))
    assert tunnels.peer("10.0.2.1", 40000, "10.0.2.5", 7000) is None
    assert tunnels.peer("10.0.2.1", 40000, "10.0.2.5", 5432) is not None
    assert tunnels.status() == {"open": 1, "opened": 2, "evicted": 0}


def test_what_is_not_a_delivered_inbound_stream_is_left_out() -> None:
    tunnels = InboundTunnels()
    tunnels.on_message(IDENT, message(
        entry(OPEN, None),  # refused before any upstream: no delivery leg
        entry(OPEN, ("10.0.2.1", 40002), principal=""),  # no URI SAN: nothing to judge it by
        entry(OPEN, ("10.0.2.1", 40003), path="l7"),  # an L7 request, not a tunnel
        entry(OPEN, ("10.0.2.1", 40004), direction="outbound"),  # the source side's log
        entry(al.DownstreamPeriodic, ("10.0.2.1", 40005))))
    assert tunnels.status()["open"] == 0


def test_the_oldest_streams_go_first_when_full() -> None:
    tunnels = InboundTunnels(capacity=3)
    tunnels.on_message(IDENT, message(*(entry(OPEN, ("10.0.2.1", 40000 + i)) for i in range(5))))
    assert [tunnels.peer("10.0.2.1", 40000 + i, "10.0.2.5", 5432) is not None for i in range(5)] == \
        [False, False, True, True, True]
    assert tunnels.status() == {"open": 3, "opened": 5, "evicted": 2}


def test_a_stream_that_opened_under_a_replaced_policy_wakes_the_revoker() -> None:
    state = ClusterState()
    enforcer = PolicyEnforcer(PolicyCompiler(), None)
    state.subscribe(enforcer.on_change)
    objs = [ns("web"), ns("shop"), pod("fe", "web", "10.0.1.5", sa="fe", node="n1"),
            pod("db", "shop", "10.0.2.5", {"app": "db"}, node="n2")]
    state.apply([Event(EventType.ADDED, parse_object(o)) for o in objs], synced=True)
    revoker = Revoker(enforcer, state, "n2", None, None, (), lambda: [])  # type: ignore[arg-type]
    stream = InboundTunnel(FE, "10.0.2.5", 5432)
    revoker.check_tunnel(stream)
    assert not revoker._wake.is_set()  # no policy: allowed, no round
    deny = authz("no-fe", "shop", {"selector": {"matchLabels": {"app": "db"}}, "action": "DENY",
                                   "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/web/sa/fe"]}}]}]})
    state.apply([Event(EventType.ADDED, parse_object(deny))])
    revoker.check_tunnel(InboundTunnel("spiffe://cluster.local/ns/web/sa/other", "10.0.2.5", 5432))
    assert not revoker._wake.is_set()  # another principal: still allowed
    revoker.check_tunnel(stream)
    assert revoker._wake.is_set()  # denied now: a round will close it
