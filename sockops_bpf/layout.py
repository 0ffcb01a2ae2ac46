"""Python mirror of maps.h. tests/test_layout.py checks that sizes and offsets agree with the C."""

from __future__ import annotations

import ctypes as ct
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class IpAddr(ct.Structure):
    _fields_ = [("addr", ct.c_uint8 * 16)]

    @classmethod
    def from_ip(cls, ip: str | IPAddress) -> IpAddr:
        a = ipaddress.ip_address(ip)
        if isinstance(a, ipaddress.IPv4Address):
            a = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + a.packed)
        return cls((ct.c_uint8 * 16).from_buffer_copy(a.packed))

    def to_ip(self) -> IPAddress:
        a = ipaddress.IPv6Address(bytes(self.addr))
        return a.ipv4_mapped or a


class EndpointInfo(ct.Structure):
    _fields_ = [("identity", ct.c_uint32), ("flags", ct.c_uint32)]


EP_F_LOOPBACK = 1


class SockKey(ct.Structure):
    _fields_ = [
        ("src_ip", IpAddr),
        ("dst_ip", IpAddr),
        ("netns_cookie", ct.c_uint64),
        ("src_port", ct.c_uint16),
        ("dst_port", ct.c_uint16),
        ("pad", ct.c_uint32),
    ]


class Counter(IntEnum):
    SOCKETS_INSERTED = 0
    INSERT_ERRORS = 1
    REDIRECT_VERDICTS = 2
    VERDICT_BYTES = 3
    FALLBACKS = 4
    GUARD_TO_TCP = 5
    GUARD_NOT_SPLICED = 6
    PROXY_BULK_TO_TCP = 7


CNT_MAX = 8


class SpliceBudget(ct.Structure):
    """maps.h struct splice_budget: bytes that may still be spliced, and whether a watcher sets it."""
    _fields_ = [("credit", ct.c_int64), ("guarded", ct.c_uint32), ("pad", ct.c_uint32)]
MAX_ENDPOINTS = 65536
MAX_SOCKETS = 131072

# name in maps.h -> (key type, value type); the layout test compiles a probe against these.
CType = type[ct.Structure] | type[ct.c_int] | type[ct.c_uint8] | type[ct.c_uint32] | type[ct.c_uint64]
MAPS: dict[str, tuple[CType, CType]] = {
    "local_endpoints": (IpAddr, EndpointInfo),
    "sock_hash": (SockKey, ct.c_int),
    "counters": (ct.c_int, ct.c_uint64),
    "tcp_only": (ct.c_int, ct.c_uint8),
    "proxy_leg": (ct.c_int, ct.c_uint64),
    "splice_budget": (ct.c_int, SpliceBudget),
}


# ---- Service load balancing (maps.h: "Service load balancing", sock_lb.c) ------------------------
LB_MAX_SERVICES = 65536
LB_MAX_SLOTS = 262144
LB_MAX_BACKENDS = 1024
LB_MAX_REVERSE = 131072
LB_MAX_AFFINITY = 65536
LB_MAX_SKIP = 16384
LB_MAX_CIDRS = 64
LB_F_AFFINITY = 1
LB_SKIP_EXCLUDED = 1
LB_SKIP_ISTIO = 2
LB_CNT_MAX = 8


class LbSvcKey(ct.Structure):
    _fields_ = [("vip", IpAddr), ("port", ct.c_uint16), ("proto", ct.c_uint8), ("pad", ct.c_uint8)]


class LbSvc(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("count", ct.c_uint32), ("flags", ct.c_uint32),
                ("affinity_timeout", ct.c_uint32)]


class LbSlotKey(ct.Structure):
    _fields_ = [("svc_id", ct.c_uint32), ("index", ct.c_uint32)]


class LbAddr(ct.Structure):
    _fields_ = [("ip", IpAddr), ("port", ct.c_uint16), ("pad", ct.c_uint16), ("pad2", ct.c_uint32)]


class LbMemberKey(ct.Structure):
    _fields_ = [("svc_id", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16), ("ip", IpAddr)]


class LbAffinityKey(ct.Structure):
    _fields_ = [("netns_cookie", ct.c_uint64), ("svc_id", ct.c_uint32), ("pad", ct.c_uint32)]


class LbAffinityEntry(ct.Structure):
    _fields_ = [("backend", LbAddr), ("last_ns", ct.c_uint64)]


class LbRevKey(ct.Structure):
    _fields_ = [("cookie", ct.c_uint64), ("ip", IpAddr), ("port", ct.c_uint16), ("pad", ct.c_uint16),
                ("pad2", ct.c_uint32)]


class LbSkipKey(ct.Structure):
    _fields_ = [("netns_cookie", ct.c_uint64)]


class LbSkipEntry(ct.Structure):
    _fields_ = [("reason", ct.c_uint32), ("pad", ct.c_uint32)]


class LbCidrKey(ct.Structure):
    """An LPM trie key: IPv4 ranges are stored IPv4-mapped, so their prefix length is 96 + the v4 one."""

    _fields_ = [("prefixlen", ct.c_uint32), ("ip", IpAddr)]


class LbCounter(IntEnum):
    TRANSLATED = 0
    NO_BACKEND = 1
    SKIPPED = 2
    AFFINITY_HIT = 3
    REVERSED = 4
    SLOT_MISS = 5
    NO_SERVICE = 6


# struct name in maps.h -> mirror (tests/test_servicelb.py compiles a probe against these).
LB_STRUCTS: dict[str, type[ct.Structure]] = {
    "lb_svc_key": LbSvcKey, "lb_svc": LbSvc, "lb_slot_key": LbSlotKey, "lb_addr": LbAddr,
    "lb_member_key": LbMemberKey, "lb_affinity_key": LbAffinityKey, "lb_affinity_entry": LbAffinityEntry,
    "lb_rev_key": LbRevKey, "lb_skip_key": LbSkipKey, "lb_skip_entry": LbSkipEntry, "lb_cidr_key": LbCidrKey,
}
MAPS.update({
    "lb_services": (LbSvcKey, LbSvc),
    "lb_slots": (LbSlotKey, LbAddr),
    "lb_members": (LbMemberKey, ct.c_uint32),
    "lb_reverse": (LbRevKey, LbAddr),
    "lb_affinity": (LbAffinityKey, LbAffinityEntry),
    "lb_skip": (LbSkipKey, LbSkipEntry),
    "lb_counters": (ct.c_int, ct.c_uint64),
    "lb_service_cidrs": (LbCidrKey, ct.c_uint32),
})


# ---- The mesh (maps.h "The mesh": ipcache, local_pods, orig_dst, capture) -------------------------
MESH_MAX_IPCACHE = 262144
MESH_MAX_LOCAL_PODS = 16384
MESH_MAX_ORIG_DST = 65536
MESH_CAPTURE_PORT = 15001
MESH_HBONE_PORT = 15008
IPC_F_LOCAL = 1
IPC_F_MTLS = 2
IPC_F_STRICT = 4
IPC_F_HOST = 8
IDENTITY_UNKNOWN = 0
IDENTITY_HOST = 1
IDENTITY_WORLD = 2
IDENTITY_REMOTE_NODE = 3
POD_F_CAPTURE = 1
MESH_CNT_MAX = 8


class IpcacheKey(ct.Structure):
    """An LPM trie key: IPv4 stored IPv4-mapped, so an IPv4 prefix length is 96 + the v4 one."""

    _fields_ = [("prefixlen", ct.c_uint32), ("ip", IpAddr)]


class IpcacheEntry(ct.Structure):
    _fields_ = [("identity", ct.c_uint32), ("flags", ct.c_uint32)]


class LocalPodKey(ct.Structure):
    _fields_ = [("netns_cookie", ct.c_uint64)]


class LocalPod(ct.Structure):
    """`struct local_pod`, layout 2: the pod's addresses came in (flows name a socket of the pod by them
    when its own address says loopback: captured and refused connections)."""

    _fields_ = [("identity", ct.c_uint32), ("flags", ct.c_uint32), ("ip4", IpAddr), ("ip6", IpAddr)]


class LocalPodV1(ct.Structure):
    """`struct local_pod` of layout 1, read by its migration."""

    _fields_ = [("identity", ct.c_uint32), ("flags", ct.c_uint32)]


class OrigDstKey(ct.Structure):
    _fields_ = [("netns_cookie", ct.c_uint64), ("ip", IpAddr), ("port", ct.c_uint16), ("pad", ct.c_uint16),
                ("pad2", ct.c_uint32)]


class MeshCounter(IntEnum):
    CAPTURED = 0
    ORIG_DST_FILED = 1
    ORIG_DST_ANSWERED = 2
    ORIG_DST_MISSED = 3
    STRICT_DROPPED = 4


MESH_STRUCTS: dict[str, type[ct.Structure]] = {
    "ipcache_key": IpcacheKey, "ipcache_entry": IpcacheEntry, "local_pod_key": LocalPodKey, "local_pod": LocalPod,
    "local_pod_v1": LocalPodV1, "orig_dst_key": OrigDstKey,
}
MAPS.update({
    "ipcache": (IpcacheKey, IpcacheEntry),
    "local_pods": (LocalPodKey, LocalPod),
    "orig_dst": (OrigDstKey, LbAddr),
    "mesh_counters": (ct.c_int, ct.c_uint64),
    "capture_dst": (ct.c_int, LbAddr),
})


# ---- Identity policy (maps.h "Identity policy") ----------------------------------------------------
POL_MAX_ENTRIES = 524288
POL_MAX_RULES = 65536
POL_ANY_PORT_PREFIXLEN = 80
POL_INGRESS = 0
POL_EGRESS = 1
POL_ALLOW = 1
POL_DENY = 2


class PolicyKeyC(ct.Structure):
    """`struct policy_key`: an LPM key; `port` is big-endian (see maps.PolicyMaps for the codec)."""

    _fields_ = [("prefixlen", ct.c_uint32), ("subject", ct.c_uint32), ("peer", ct.c_uint32),
                ("direction", ct.c_uint8), ("proto", ct.c_uint8), ("port", ct.c_uint16)]


class PolicyValueC(ct.Structure):
    _fields_ = [("verdict", ct.c_uint32), ("rule", ct.c_uint32)]


POLICY_STRUCTS: dict[str, type[ct.Structure]] = {"policy_key": PolicyKeyC, "policy_value": PolicyValueC}
MAPS.update({
    "policy": (PolicyKeyC, PolicyValueC),
    "policy_denies": (ct.c_uint32, ct.c_uint64),
})


# ---- Layout versions and migrations ----------------------------------------------------------------
# A map whose key, value or size changes gets the next version here and in maps.h, where its pin becomes
# <name>_v<N> (layout 1 keeps the bare name). Loading over pins of an older layout, the loader copies the
# entries through the map's migration, then the new programs take over, then the old pin goes. A map
# whose entries cannot be copied from user space (sock_hash holds sockets, sk_storage lives on them)
# is never migrated: its old pin stays with the old programs attached to it, so connections spliced
# before the upgrade drain on the old layout (as `accel uninstall` drains), and goes once empty.
LAYOUT_VERSIONS: dict[str, int] = {"local_pods": 2}



@dataclass(frozen=True, slots=True)
class Migration:
    """How entries of one older layout become entries of the current one (None: dropped)."""

    key: type[ct.Structure]  # the old key type
    value: type[ct.Structure]  # the old value type
    convert: Callable[[ct.Structure, ct.Structure], tuple[ct.Structure, ct.Structure] | None]


def _local_pods_1_to_2(key: ct.Structure, value: ct.Structure) -> tuple[ct.Structure, ct.Structure]:
    # The addresses are unknown to the old layout: zero until the agent's first sync writes them.
    return key, LocalPod(value.identity, value.flags, IpAddr(), IpAddr())  # type: ignore[attr-defined]


MIGRATIONS: dict[tuple[str, int], Migration] = {  # (map, from version) -> Migration
    ("local_pods", 1): Migration(LocalPodKey, LocalPodV1, _local_pods_1_to_2),
}


def layout_version(name: str) -> int:
    return LAYOUT_VERSIONS.get(name, 1)


def pin_name(name: str, version: int | None = None) -> str:
    """The pin of map `name` at a layout version (the current one by default)."""
    v = layout_version(name) if version is None else version
    return name if v == 1 else f"{name}_v{v}"


# ---- Flows (maps.h "Flows") ------------------------------------------------------------------------
FLOW_RING_BYTES = 4 << 20
FLOW_OPEN, FLOW_CLOSE, FLOW_REFUSED = 1, 2, 3
FLOW_PATH_TCP, FLOW_PATH_SPLICED, FLOW_PATH_TUNNEL, FLOW_PATH_UDP = 1, 2, 3, 4
FLOW_REASON_NO_BACKEND, FLOW_REASON_NO_SERVICE, FLOW_REASON_POLICY, FLOW_REASON_STRICT_PLAINTEXT = 1, 2, 3, 4
FLOW_F_BYTES_LOWER_BOUND = 1
FLOW_CNT_MAX = 4


class FlowEvent(ct.Structure):
    _fields_ = [("time_ns", ct.c_uint64), ("cookie", ct.c_uint64), ("bytes_sent", ct.c_uint64),
                ("bytes_received", ct.c_uint64), ("duration_ns", ct.c_uint64), ("src", IpAddr), ("dst", IpAddr),
                ("svc", IpAddr), ("src_identity", ct.c_uint32), ("dst_identity", ct.c_uint32), ("rule", ct.c_uint32),
                ("sport", ct.c_uint16), ("dport", ct.c_uint16), ("svc_port", ct.c_uint16), ("kind", ct.c_uint8),
                ("path", ct.c_uint8), ("reason", ct.c_uint8), ("proto", ct.c_uint8), ("flags", ct.c_uint8),
                ("pad", ct.c_uint8)]


class FlowState(ct.Structure):
    _fields_ = [("start_ns", ct.c_uint64), ("spliced_bytes", ct.c_uint64), ("src", IpAddr), ("dst", IpAddr),
                ("svc", IpAddr), ("src_identity", ct.c_uint32), ("dst_identity", ct.c_uint32), ("sport", ct.c_uint16),
                ("dport", ct.c_uint16), ("svc_port", ct.c_uint16), ("path", ct.c_uint8), ("client", ct.c_uint8),
                ("spliced", ct.c_uint8), ("pad", ct.c_uint8 * 7)]


class FlowCounter(IntEnum):
    EMITTED = 0
    DROPPED = 1


FLOW_STRUCTS: dict[str, type[ct.Structure]] = {"flow_event": FlowEvent, "flow_state": FlowState}
MAPS.update({
    "flow_counters": (ct.c_int, ct.c_uint64),
    "flow_state": (ct.c_int, FlowState),
})
