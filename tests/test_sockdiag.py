"""sock_diag as the Revoker uses it, on real sockets over loopback: an IPv6 socket's IPv4-mapped addresses
(a dual-stack server's IPv4 connection) read as the IPv4 address, and destroying such a socket works."""

from __future__ import annotations

import os
import socket

import pytest

from accel import sockdiag

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("MESHACCEL_REQUIRE_BPF"),
                                reason="SOCK_DESTROY needs root")


def test_an_ipv6_sockets_ipv4_mapped_peer_reads_and_destroys_as_ipv4() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind(("::ffff:127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        accepted, _ = server.accept()
        with client, accepted:
            cport = client.getsockname()[1]
            mine = [s for s in sockdiag.tcp_sockets(sockdiag.OPEN_STATES) if s.sport == port and s.dport == cport]
            assert len(mine) == 1
            s = mine[0]
            assert (s.family, s.src, s.dst) == (socket.AF_INET6, "127.0.0.1", "127.0.0.1"), s
            assert sockdiag.destroy([s]) == 1

            def peer_gone() -> bool:  # the server side was aborted: the client is reset (or sees the end)
                try:
                    client.sendall(b"x")
                    return client.recv(1) == b""
                except OSError:
                    return True
            assert peer_gone()
