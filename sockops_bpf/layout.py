"""Python mirror of maps.h. tests/test_layout.py checks that sizes and offsets agree with the C."""

from __future__ import annotations

import ctypes as ct
import ipaddress
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


CNT_MAX = 8
MAX_ENDPOINTS = 65536
MAX_SOCKETS = 131072

# name in maps.h -> (key type, value type); the layout test compiles a probe against these.
MAPS: dict[str, tuple[type[ct.Structure] | type[ct.c_int], type[ct.Structure] | type[ct.c_int] | type[ct.c_uint64]]] = {
    "local_endpoints": (IpAddr, EndpointInfo),
    "sock_hash": (SockKey, ct.c_int),
    "counters": (ct.c_int, ct.c_uint64),
}
