"""Port sets and the decomposition of port ranges into the prefixes of an LPM key.

A PortSet is a sorted tuple of (proto, lo, hi) with inclusive, disjoint, non-adjacent ranges per
protocol: hashable and comparable, so rule results can be cached by it. Ports are 0..65535; the
policy key stores the port big-endian, so a range is a set of (first port, prefix bits) pairs:
bits = 16 covers one port, bits = 0 every port of the protocol.
"""

from __future__ import annotations

from collections.abc import Iterable

PortRange = tuple[int, int, int]  # (proto, lo, hi), inclusive
PortSet = tuple[PortRange, ...]

TCP, UDP, SCTP = 6, 17, 132
PROTOCOLS: dict[str, int] = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}
PROTO_NUMBERS: tuple[int, ...] = (TCP, UDP, SCTP)
PORT_MAX = 65535

EMPTY: PortSet = ()


def portset(ranges: Iterable[PortRange]) -> PortSet:
    """The canonical PortSet of any ranges (overlapping or adjacent ones merge)."""
    out: list[list[int]] = []
    for proto, lo, hi in sorted(ranges):
        if lo > hi:
            continue
        if out and out[-1][0] == proto and lo <= out[-1][2] + 1:
            out[-1][2] = max(out[-1][2], hi)
        else:
            out.append([proto, lo, hi])
    return tuple((p, lo, hi) for p, lo, hi in out)


def all_ports(protos: Iterable[int] = PROTO_NUMBERS) -> PortSet:
    return portset((p, 0, PORT_MAX) for p in protos)


def union(*sets: PortSet) -> PortSet:
    return portset(r for s in sets for r in s)


def intersect(a: PortSet, b: PortSet) -> PortSet:
    out = []
    for pa, la, ha in a:
        for pb, lb, hb in b:
            if pa == pb and max(la, lb) <= min(ha, hb):
                out.append((pa, max(la, lb), min(ha, hb)))
    return portset(out)


def minus(a: PortSet, b: PortSet) -> PortSet:
    out: list[PortRange] = []
    for proto, lo, hi in a:
        pieces = [(lo, hi)]
        for pb, lb, hb in b:
            if pb != proto:
                continue
            nxt = []
            for x, y in pieces:
                if hb < x or lb > y:
                    nxt.append((x, y))
                    continue
                if x < lb:
                    nxt.append((x, lb - 1))
                if hb < y:
                    nxt.append((hb + 1, y))
            pieces = nxt
        out += [(proto, x, y) for x, y in pieces]
    return portset(out)


def contains(s: PortSet, proto: int, port: int) -> bool:
    return any(p == proto and lo <= port <= hi for p, lo, hi in s)


def prefixes(lo: int, hi: int) -> list[tuple[int, int]]:
    """The fewest aligned prefixes (first port, prefix bits) that cover exactly lo..hi."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16  # the largest block aligned at lo
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


def prefix_range(port: int, bits: int) -> tuple[int, int]:
    """The ports one prefix covers (inverse of `prefixes` for a single entry)."""
    size = 1 << (16 - bits)
    return port, port + size - 1


def describe(s: PortSet) -> str:
    """Readable text: "TCP 80, TCP 8000-8080, UDP any"."""
    names = {v: k for k, v in PROTOCOLS.items()}
    parts = []
    for p, lo, hi in s:
        name = names.get(p, str(p))
        parts.append(f"{name} any" if (lo, hi) == (0, PORT_MAX) else f"{name} {lo}" if lo == hi else f"{name} {lo}-{hi}")
    return ", ".join(parts) or "no port"
