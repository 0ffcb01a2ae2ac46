"""A bulk transfer into a receiver that reads nothing until told: how a test shows that a sender is made to
wait (by TCP) instead of queueing without bound in the kernel (spliced bytes have no flow control).

The server (in one lab pod) takes one connection on port 7400, reads nothing until `finish()`, then reads to
the end; the client (in another pod) sends `size` bytes of a fixed pseudo-random pattern. `finish()` checks
that every byte arrived, in order."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from typing import Any

from accel.lab import Lab

SERVER = r"""
import hashlib, socket, sys
s = socket.create_server(("0.0.0.0", 7400))
print("listening", flush=True)
c, _ = s.accept()
sys.stdin.readline()
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    h.update(b)
    n += len(b)
print(n, h.hexdigest(), flush=True)
"""

CLIENT = r"""
import random, socket, sys
size = int(sys.argv[2])
block = random.Random(7).randbytes(1 << 20)
c = socket.create_connection((sys.argv[1], 7400))
sent = 0
while sent < size:
    c.sendall(block)
    sent += len(block)
c.close()
print("done", sent, flush=True)
"""


class PausedTransfer:
    """`with PausedTransfer(lab, "pod2", "pod1", size) as t: t.start(); ...; t.finish()`."""

    def __init__(self, lab: Lab, server: str, client: str, size: int) -> None:
        self.lab, self.client_pod, self.size = lab, client, size
        self.ip = lab.pod(server).ipv4
        self.server = lab.popen(server, [sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        self.client: subprocess.Popen[str] | None = None
        assert self.server.stdout is not None and self.server.stdout.readline().strip() == "listening"

    def start(self) -> None:
        self.client = self.lab.popen(self.client_pod, [sys.executable, "-c", CLIENT, self.ip, str(self.size)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sending(self) -> bool:
        return self.client is not None and self.client.poll() is None

    def finish(self) -> None:
        """Let the server read; the client must finish and the server must have every byte, in order."""
        assert self.client is not None and self.server.stdin is not None
        self.server.stdin.write("read\n")
        self.server.stdin.flush()
        out, err = self.client.communicate(timeout=120)
        assert self.client.returncode == 0 and f"done {self.size}" in out, err[-500:]
        got = self.server.communicate(timeout=120)[0].split()
        block, want = random.Random(7).randbytes(1 << 20), hashlib.sha256()
        for _ in range(self.size // len(block)):
            want.update(block)
        assert got == [str(self.size), want.hexdigest()]

    def __enter__(self) -> PausedTransfer:
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in (self.server, self.client):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
