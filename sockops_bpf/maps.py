"""Read and write the pinned maps of an instance without compiling anything.

`open_pinned(pin_dir)` is what the agent's reconciler and `accel status` use:
  maps.local_endpoints   MutableMapping[str, int]: pod IP (v4 or v6 text) -> identity u32
  maps.counters()        summed per-CPU counters
  maps.socket_count()    sockets currently spliced
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from accel.errors import UserError
from sockops_bpf import libbpf
from sockops_bpf.layout import CNT_MAX, EP_F_LOOPBACK, Counter, EndpointInfo, IpAddr, SockKey


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
            raise UserError(f"cannot open pinned maps in {pin_dir} ({e.strerror}); is the instance loaded?") from e
        self.local_endpoints = EndpointMap(self._fds["local_endpoints"])

    def counters(self) -> dict[str, int]:
        ncpu = os.cpu_count() or 1
        # Per-CPU values are exported for every possible CPU; size the buffer generously.
        possible = _possible_cpus() or ncpu
        out = {}
        for c in Counter:
            vals = (ct.c_uint64 * possible)()
            libbpf.map_lookup(self._fds["counters"], ct.c_int(int(c)), vals)
            out[c.name.lower()] = int(sum(vals))
        assert len(Counter) <= CNT_MAX
        return out

    def socket_count(self) -> int:
        return len(libbpf.map_keys(self._fds["sock_hash"], SockKey))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> PinnedMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
