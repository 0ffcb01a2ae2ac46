"""TCP sockets of a network namespace through netlink sock_diag: list them (an inet_diag dump, as `ss`
does) and destroy one (SOCK_DESTROY, which needs the kernel's INET_DIAG_DESTROY): how a policy change
closes the connections it no longer allows, spliced ones included. The application sees ECONNABORTED
and its peer an RST; destroying a socket of the fast path drops what was queued for it, which is what a
connection being killed may lose.

Run `tcp_sockets`/`destroy` for a pod with `accel.netns.run_in(pod's netns path, ...)`; the netlink
socket must be opened in the namespace whose sockets it asks about.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_CLOSE_WAIT, TCP_LISTEN = 1, 2, 8, 10
ALL_STATES = 0xFFFFFFFF
# States a connection is alive in, data still able to flow at least one way (not TIME_WAIT or closing).
OPEN_STATES = (1 << TCP_ESTABLISHED) | (1 << TCP_SYN_SENT) | (1 << TCP_CLOSE_WAIT) | (1 << 4) | (1 << 5)

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst: big-endian...
_COOKIE = struct.Struct("=III")  # ...then interface and the cookie's two halves, in host order
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode


@dataclass(frozen=True, slots=True)
class TcpSocket:
    family: int
    state: int
    src: str  # as the model writes addresses: an IPv6 socket's IPv4-mapped address is the IPv4 one
    sport: int
    dst: str
    dport: int
    cookie: int  # the kernel's socket cookie (what bpf_get_socket_cookie says)
    ifindex: int = 0
    inode: int = 0

    @property
    def listening(self) -> bool:
        return self.state == TCP_LISTEN


def _addr(family: int, raw: bytes) -> str:
    """The address as the model writes it: an IPv6 socket's IPv4-mapped address (a dual-stack socket's
    IPv4 peer, what Go, Java and Node servers have) is its IPv4 address."""
    if family == socket.AF_INET:
        return socket.inet_ntop(family, raw[:4])
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


def _raw(family: int, ip: str) -> bytes:
    if family == socket.AF_INET6 and "." in ip:  # an IPv6 socket's IPv4-mapped address, back to its wire form
        ip = f"::ffff:{ip}"
    packed = socket.inet_pton(family, ip)
    return packed + bytes(16 - len(packed))


def _request(family: int, states: int, sockid: bytes, msg_type: int, flags: int, seq: int) -> bytes:
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, states) + sockid
    return _NLMSG.pack(_NLMSG.size + len(body), msg_type, flags, seq, 0) + body


def _sockid(s: TcpSocket) -> bytes:
    return (_SOCKID.pack(s.sport, s.dport, _raw(s.family, s.src), _raw(s.family, s.dst))
            + _COOKIE.pack(s.ifindex, s.cookie & 0xFFFFFFFF, s.cookie >> 32))


def _messages(sock: socket.socket, seq: int) -> Iterable[tuple[int, bytes]]:
    """(type, payload) of every netlink message answering `seq`, until DONE (or the one ACK/ERROR)."""
    while True:
        data = sock.recv(1 << 16)
        off = 0
        while off + _NLMSG.size <= len(data):
            length, mtype, _flags, mseq, _pid = _NLMSG.unpack_from(data, off)
            payload = data[off + _NLMSG.size:off + length]
            off += (length + 3) & ~3
            if mseq != seq:
                continue
            if mtype == NLMSG_DONE:
                return
            yield mtype, payload
            if mtype == NLMSG_ERROR:
                return


def tcp_sockets(states: int = ALL_STATES) -> list[TcpSocket]:
    """Every TCP socket of this thread's network namespace in `states` (a bit mask of TCP states)."""
    out: list[TcpSocket] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            nl.send(_request(family, states, bytes(_SOCKID.size + _COOKIE.size), SOCK_DIAG_BY_FAMILY,
                             NLM_F_REQUEST | NLM_F_DUMP, seq))
            for mtype, p in _messages(nl, seq):
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", p)[0]
                    raise OSError(code, f"sock_diag dump: {os.strerror(code)}")
                fam, state, _timer, _retrans = _MSG_HEAD.unpack_from(p)
                sport, dport, src, dst = _SOCKID.unpack_from(p, _MSG_HEAD.size)
                ifindex, lo, hi = _COOKIE.unpack_from(p, _MSG_HEAD.size + _SOCKID.size)
                inode = _MSG_TAIL.unpack_from(p, _MSG_HEAD.size + _SOCKID.size + _COOKIE.size)[4]
                out.append(TcpSocket(fam, state, _addr(fam, src), sport, _addr(fam, dst), dport, lo | hi << 32,
                                     ifindex, inode))
    return out


def destroy(sockets: Iterable[TcpSocket]) -> int:
    """Destroy each socket (in this thread's namespace); the number destroyed (gone already: not counted).
    OSError(EOPNOTSUPP) when the kernel was built without INET_DIAG_DESTROY."""
    done = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        for seq, s in enumerate(sockets, start=1):
            nl.send(_request(s.family, ALL_STATES, _sockid(s), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq))
            for mtype, p in _messages(nl, seq):
                if mtype != NLMSG_ERROR:
                    continue
                code = -struct.unpack_from("=i", p)[0]
                if code == 0:
                    done += 1
                elif code == errno.EOPNOTSUPP:
                    raise OSError(code, "SOCK_DESTROY is not supported by this kernel (CONFIG_INET_DIAG_DESTROY)")
                elif code not in (errno.ENOENT, errno.ESRCH):  # closed meanwhile: nothing to do
                    raise OSError(code, f"SOCK_DESTROY {s.src}:{s.sport} -> {s.dst}:{s.dport}: {os.strerror(code)}")
    return done
