"""Read and write the pinned maps of an instance without compiling anything.

`open_pinned(pin_dir)` is what the agent's reconciler and `accel status` use:
  maps.local_endpoints   MutableMapping[str, int]: pod IP (v4 or v6 text) -> identity u32
  maps.counters()        summed per-CPU counters
  maps.socket_count()    sockets currently spliced
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ipaddress
import os
import socket
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar, cast

from sockops_bpf import libbpf
from sockops_bpf.errors import BpfError
from sockops_bpf.layout import (
    CNT_MAX,
    EP_F_LOOPBACK,
    POL_ANY_PORT_PREFIXLEN,
    Counter,
    EndpointInfo,
    IpAddr,
    IpcacheEntry,
    IpcacheKey,
    LbAddr,
    LbAffinityEntry,
    LbAffinityKey,
    LbCidrKey,
    LbCounter,
    LbMemberKey,
    LbRevKey,
    LbSkipEntry,
    LbSkipKey,
    LbSlotKey,
    LbSvc,
    LbSvcKey,
    LocalPod,
    LocalPodKey,
    MeshCounter,
    OrigDstKey,
    PolicyKeyC,
    PolicyValueC,
    SockKey,
    SpliceBudget,
    pin_name,
)


class EndpointMap(MutableMapping[str, int]):
    """local_endpoints as a mapping. Loopback addresses are flagged so sockets between them are keyed
    per network namespace (every pod has its own 127.0.0.1)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __getitem__(self, ip: str) -> int:
        info = EndpointInfo()
        if not libbpf.map_lookup(self._fd, IpAddr.from_ip(ip), info):
            raise KeyError(ip)
        return int(info.identity)

    def __setitem__(self, ip: str, identity: int) -> None:
        flags = EP_F_LOOPBACK if ipaddress.ip_address(ip).is_loopback else 0
        libbpf.map_update(self._fd, IpAddr.from_ip(ip), EndpointInfo(identity, flags))

    def __delitem__(self, ip: str) -> None:
        if not libbpf.map_delete(self._fd, IpAddr.from_ip(ip)):
            raise KeyError(ip)

    def __iter__(self) -> Iterator[str]:
        return (str(k.to_ip()) for k in libbpf.map_keys(self._fd, IpAddr))  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(libbpf.map_keys(self._fd, IpAddr))


class PinnedMaps:
    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._fds: dict[str, int] = {}
        try:
            for name in ("local_endpoints", "sock_hash", "counters"):
                self._fds[name] = libbpf.obj_get(str(pin_dir / name))
        except OSError as e:
            self.close()
            raise BpfError(f"cannot open pinned maps in {pin_dir} ({e.strerror}); is the instance loaded?") from e
        self.local_endpoints = EndpointMap(self._fds["local_endpoints"])
        # Absent in an instance loaded by a release before the budget: set_splice_budget() says so.
        with contextlib.suppress(OSError):
            self._fds["splice_budget"] = libbpf.obj_get(str(pin_dir / "splice_budget"))

    def counters(self) -> dict[str, int]:
        assert len(Counter) <= CNT_MAX
        return percpu_counters(self._fds["counters"], Counter)

    def set_splice_budget(self, credit: int) -> None:
        """Set the splice budget (maps.h): `credit` bytes may be spliced until the next call."""
        fd = self._fds.get("splice_budget")
        if fd is None:
            raise BpfError(f"no splice_budget map in {self.pin_dir}; reload the programs (accel load)")
        libbpf.map_update(fd, ct.c_int(0), SpliceBudget(credit, 1, 0))  # type: ignore[arg-type]

    def splice_budget(self) -> SpliceBudget | None:
        fd = self._fds.get("splice_budget")
        value = SpliceBudget()
        return value if fd is not None and libbpf.map_lookup(fd, ct.c_int(0), value) else None  # type: ignore[arg-type]

    def socket_count(self) -> int:
        return len(self.socket_keys())

    def socket_keys(self) -> list[SockKey]:
        return libbpf.map_keys(self._fds["sock_hash"], SockKey)  # type: ignore[return-value]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> PinnedMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def percpu_counters(fd: int, names: type[IntEnum], prefix: str = "") -> dict[str, int]:
    """A per-CPU array of counters, summed over CPUs, named `prefix` + the enum member's name."""
    # Per-CPU values are exported for every possible CPU (not just online ones).
    possible = _possible_cpus() or os.cpu_count() or 1
    out = {}
    for c in names:
        vals = (ct.c_uint64 * possible)()
        libbpf.map_lookup(fd, ct.c_int(int(c)), vals)
        out[prefix + c.name.lower()] = int(sum(vals))
    return out


def _possible_cpus() -> int:
    """Number of possible CPUs (per-CPU map values come in that many slots)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return 0
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def open_pinned(pin_dir: Path) -> PinnedMaps:
    return PinnedMaps(pin_dir)


# ---- Service load balancing maps (maps.h "Service load balancing") ------------------------------
# Views keyed and valued by small frozen records, so the reconciler never handles ctypes.

LB_MAP_NAMES = ("lb_services", "lb_slots", "lb_members", "lb_reverse", "lb_affinity", "lb_skip", "lb_counters",
                "lb_service_cidrs")


@dataclass(frozen=True, slots=True, order=True)
class Frontend:
    """One (cluster IP, port, protocol) of a Service; proto is the IP protocol number (6 TCP, 17 UDP)."""

    vip: str
    port: int
    proto: int

    def c(self) -> LbSvcKey:
        return LbSvcKey(IpAddr.from_ip(self.vip), self.port, self.proto, 0)

    @classmethod
    def of(cls, k: LbSvcKey) -> Frontend:
        return cls(str(k.vip.to_ip()), int(k.port), int(k.proto))


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    ip: str
    port: int

    def c(self) -> LbAddr:
        return LbAddr(IpAddr.from_ip(self.ip), self.port, 0, 0)

    @classmethod
    def of(cls, a: LbAddr) -> Backend:
        return cls(str(a.ip.to_ip()), int(a.port))


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    id: int
    count: int
    flags: int = 0
    affinity_timeout: int = 0

    def c(self) -> LbSvc:
        return LbSvc(self.id, self.count, self.flags, self.affinity_timeout)

    @classmethod
    def of(cls, v: LbSvc) -> ServiceEntry:
        return cls(int(v.id), int(v.count), int(v.flags), int(v.affinity_timeout))


K = TypeVar("K")
V = TypeVar("V")


class _View(MutableMapping[K, V], Generic[K, V]):
    """A pinned hash map seen through key/value codecs. Every write is one map syscall."""

    def __init__(self, fd: int, ckey: type[ct.Structure], cval: type[ct.Structure] | type[ct.c_uint32],
                 enc_key: Any, dec_key: Any, enc_val: Any, dec_val: Any) -> None:
        self._fd, self._ckey, self._cval = fd, ckey, cval
        self._ek, self._dk, self._ev, self._dv = enc_key, dec_key, enc_val, dec_val

    def __getitem__(self, key: K) -> V:
        val = self._cval()
        if not libbpf.map_lookup(self._fd, self._ek(key), cast(ct.Structure, val)):
            raise KeyError(key)
        return cast(V, self._dv(val))

    def __setitem__(self, key: K, value: V) -> None:
        libbpf.map_update(self._fd, self._ek(key), self._ev(value))

    def __delitem__(self, key: K) -> None:
        if not libbpf.map_delete(self._fd, self._ek(key)):
            raise KeyError(key)

    def __iter__(self) -> Iterator[K]:
        return (cast(K, self._dk(k)) for k in libbpf.map_keys(self._fd, self._ckey))

    def __len__(self) -> int:
        return len(libbpf.map_keys(self._fd, self._ckey))


class LbMaps:
    """The service LB maps of an instance:
      services   Frontend -> ServiceEntry          lb_services
      slots      (frontend id, index) -> Backend   lb_slots
      members    (frontend id, Backend) -> index   lb_members
      skip       netns cookie -> LB_SKIP_* reason  lb_skip
      affinity   (netns cookie, frontend id) -> (Backend, last use ns)   lb_affinity (LRU, kernel-written)
      reverse    (socket cookie, Backend) -> Backend of the frontend     lb_reverse (LRU, kernel-written)
      service_cidrs  CIDR text -> 1                     lb_service_cidrs (LPM trie): no service there = refused
    """

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._fds: dict[str, int] = {}
        try:
            for name in LB_MAP_NAMES:
                self._fds[name] = libbpf.obj_get(str(pin_dir / name))
        except OSError as e:
            self.close()
            raise BpfError(f"cannot open service LB maps in {pin_dir} ({e.strerror}); is the instance loaded "
                            "with sock_lb.c?") from e
        f = self._fds
        self.services: MutableMapping[Frontend, ServiceEntry] = _View(
            f["lb_services"], LbSvcKey, LbSvc, Frontend.c, Frontend.of, ServiceEntry.c, ServiceEntry.of)
        self.slots: MutableMapping[tuple[int, int], Backend] = _View(
            f["lb_slots"], LbSlotKey, LbAddr, lambda k: LbSlotKey(*k), lambda k: (int(k.svc_id), int(k.index)),
            Backend.c, Backend.of)
        self.members: MutableMapping[tuple[int, Backend], int] = _View(
            f["lb_members"], LbMemberKey, ct.c_uint32,
            lambda k: LbMemberKey(k[0], k[1].port, 0, IpAddr.from_ip(k[1].ip)),
            lambda k: (int(k.svc_id), Backend(str(k.ip.to_ip()), int(k.port))),
            ct.c_uint32, lambda v: int(v.value))
        self.skip: MutableMapping[int, int] = _View(
            f["lb_skip"], LbSkipKey, LbSkipEntry, LbSkipKey, lambda k: int(k.netns_cookie),
            lambda v: LbSkipEntry(v, 0), lambda v: int(v.reason))
        self.affinity: MutableMapping[tuple[int, int], tuple[Backend, int]] = _View(
            f["lb_affinity"], LbAffinityKey, LbAffinityEntry, lambda k: LbAffinityKey(k[0], k[1], 0),
            lambda k: (int(k.netns_cookie), int(k.svc_id)),
            lambda v: LbAffinityEntry(v[0].c(), v[1]), lambda v: (Backend.of(v.backend), int(v.last_ns)))
        self.reverse: MutableMapping[tuple[int, Backend], Backend] = _View(
            f["lb_reverse"], LbRevKey, LbAddr,
            lambda k: LbRevKey(k[0], IpAddr.from_ip(k[1].ip), k[1].port, 0, 0),
            lambda k: (int(k.cookie), Backend(str(k.ip.to_ip()), int(k.port))), Backend.c, Backend.of)

        self.service_cidrs: MutableMapping[str, int] = _View(
            f["lb_service_cidrs"], LbCidrKey, ct.c_uint32, _cidr_key, _cidr_text, ct.c_uint32, lambda v: int(v.value))

    def counters(self) -> dict[str, int]:
        return percpu_counters(self._fds["lb_counters"], LbCounter, "lb_")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> LbMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cidr_key(cidr: str) -> LbCidrKey:
    net = ipaddress.ip_network(cidr, strict=True)
    extra = 96 if net.version == 4 else 0
    return LbCidrKey(net.prefixlen + extra, IpAddr.from_ip(net.network_address))


def _cidr_text(k: LbCidrKey) -> str:
    ip = ipaddress.IPv6Address(bytes(k.ip.addr))
    if ip.ipv4_mapped is not None and k.prefixlen >= 96:
        return str(ipaddress.ip_network((ip.ipv4_mapped, int(k.prefixlen) - 96)))
    return str(ipaddress.ip_network((ip, int(k.prefixlen))))


def open_lb(pin_dir: Path) -> LbMaps:
    return LbMaps(pin_dir)


# ---- The mesh maps (maps.h "The mesh") ----------------------------------------------------------

MESH_MAP_NAMES = ("ipcache", "local_pods", "orig_dst", "mesh_counters")


@dataclass(frozen=True, slots=True)
class AddressInfo:
    """What the kernel knows of an address (ipcache): its identity and IPC_F_* flags."""

    identity: int
    flags: int


@dataclass(frozen=True, slots=True)
class PodInfo:
    """A pod of this node, found by its network namespace (local_pods): identity, POD_F_* flags, and its
    addresses ("" when it has none of that family)."""

    identity: int
    flags: int
    ip4: str = ""
    ip6: str = ""


def _ip_or_empty(a: IpAddr) -> str:
    return "" if not any(a.addr) else str(a.to_ip())


class MeshMaps:
    """The mesh maps of an instance:
      ipcache     CIDR text ("10.0.0.5/32", "fd00::/64") -> AddressInfo      (LPM trie)
      local_pods  netns cookie -> PodInfo
      orig_dst    (netns cookie, client address, client port) -> Backend    (LRU, kernel-written; read only)
    """

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._fds: dict[str, int] = {}
        try:
            for name in MESH_MAP_NAMES:
                self._fds[name] = libbpf.obj_get(str(pin_dir / pin_name(name)))
        except OSError as e:
            self.close()
            raise BpfError(f"cannot open the mesh maps in {pin_dir} ({e.strerror}); is the instance loaded?") from e
        f = self._fds
        self.ipcache: MutableMapping[str, AddressInfo] = _View(
            f["ipcache"], IpcacheKey, IpcacheEntry, _ipcache_key, _ipcache_text,
            lambda v: IpcacheEntry(v.identity, v.flags), lambda v: AddressInfo(int(v.identity), int(v.flags)))
        self.local_pods: MutableMapping[int, PodInfo] = _View(
            f["local_pods"], LocalPodKey, LocalPod, LocalPodKey, lambda k: int(k.netns_cookie),
            lambda v: LocalPod(v.identity, v.flags, IpAddr.from_ip(v.ip4) if v.ip4 else IpAddr(),
                               IpAddr.from_ip(v.ip6) if v.ip6 else IpAddr()),
            lambda v: PodInfo(int(v.identity), int(v.flags), _ip_or_empty(v.ip4), _ip_or_empty(v.ip6)))
        self.orig_dst: MutableMapping[tuple[int, str, int], Backend] = _View(
            f["orig_dst"], OrigDstKey, LbAddr,
            lambda k: OrigDstKey(k[0], IpAddr.from_ip(k[1]), k[2], 0, 0),
            lambda k: (int(k.netns_cookie), str(k.ip.to_ip()), int(k.port)), Backend.c, Backend.of)

    def counters(self) -> dict[str, int]:
        return percpu_counters(self._fds["mesh_counters"], MeshCounter, "mesh_")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> MeshMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ipcache_key(cidr: str) -> IpcacheKey:
    net = ipaddress.ip_network(cidr, strict=True)
    return IpcacheKey(net.prefixlen + (96 if net.version == 4 else 0), IpAddr.from_ip(net.network_address))


def _ipcache_text(k: IpcacheKey) -> str:
    return _cidr_text(LbCidrKey(k.prefixlen, k.ip))


def open_mesh(pin_dir: Path) -> MeshMaps:
    return MeshMaps(pin_dir)


# ---- Identity policy maps (maps.h "Identity policy") ---------------------------------------------

POLICY_MAP_NAMES = ("policy", "policy_denies")


class PolicyRuleKey(NamedTuple):
    """A policy map key: (subject, peer, direction, proto) and a port prefix, `port` its first port and
    `port_bits` its length (0: any port of proto, 16: one port)."""

    subject: int
    peer: int
    direction: int
    proto: int
    port: int
    port_bits: int


class PolicyRuleValue(NamedTuple):
    verdict: int  # POL_ALLOW / POL_DENY
    rule: int


def _policy_key(k: tuple[int, int, int, int, int, int]) -> PolicyKeyC:
    subject, peer, direction, proto, port, bits = k
    return PolicyKeyC(POL_ANY_PORT_PREFIXLEN + bits, subject, peer, direction, proto, socket.htons(port))


def _policy_key_of(k: PolicyKeyC) -> PolicyRuleKey:
    return PolicyRuleKey(int(k.subject), int(k.peer), int(k.direction), int(k.proto), socket.ntohs(k.port),
                         int(k.prefixlen) - POL_ANY_PORT_PREFIXLEN)


class PolicyMaps:
    """The policy maps of an instance:
      policy   PolicyRuleKey -> PolicyRuleValue   (LPM trie; written by the agent's compiler)
      denies() rule -> denied attempts, summed over CPUs (kernel-written)
    """

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._fds: dict[str, int] = {}
        try:
            for name in POLICY_MAP_NAMES:
                self._fds[name] = libbpf.obj_get(str(pin_dir / name))
        except OSError as e:
            self.close()
            raise BpfError(f"cannot open the policy maps in {pin_dir} ({e.strerror}); is the instance loaded?") from e
        self.policy: MutableMapping[tuple[int, int, int, int, int, int], tuple[int, int]] = _View(
            self._fds["policy"], PolicyKeyC, PolicyValueC, _policy_key, _policy_key_of,
            lambda v: PolicyValueC(v[0], v[1]), lambda v: PolicyRuleValue(int(v.verdict), int(v.rule)))

    def denies(self) -> dict[int, int]:
        possible = _possible_cpus() or os.cpu_count() or 1
        out = {}
        fd = self._fds["policy_denies"]
        for k in libbpf.map_keys(fd, ct.c_uint32):  # type: ignore[arg-type]
            vals = (ct.c_uint64 * possible)()
            if libbpf.map_lookup(fd, k, vals):
                out[int(k.value)] = int(sum(vals))  # type: ignore[attr-defined]
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> PolicyMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_policy(pin_dir: Path) -> PolicyMaps:
    return PolicyMaps(pin_dir)
