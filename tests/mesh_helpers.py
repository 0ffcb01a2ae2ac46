"""Helpers for tests of the mesh in the lab: the HBONE test client run inside a pod, small TCP apps, and
what a module's two-node lab holds (certificates from the lab's CA are accel/lab_certs.py's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from accel.lab import Lab
from accel.lab_agent import LabAgent, LabCluster
from accel.lab_certs import Credential


class ClusterLab:
    """A lab and its control plane (an agent and Envoy per node), a folder for the servers' logs, and the
    processes a test module started in its pods (to end with the lab)."""

    def __init__(self, lab: Lab, cluster: LabCluster, logs: Path) -> None:
        self.lab = lab
        self.cluster = cluster
        self.logs = logs
        self.procs: list[subprocess.Popen[str]] = []

    def ip(self, pod: str) -> str:
        return self.lab.pod(pod).ipv4

    def agent(self, node: str) -> LabAgent:
        return self.cluster.agents[node]

    def down(self) -> None:
        """End the processes started in the pods, then the control plane, then the lab."""
        for p in self.procs:
            p.kill()
            p.wait()
        self.cluster.down()
        self.lab.down()


def hbone(lab: Lab, pod: str, addr: str, cred: Credential | None, *extra: str, ca: Path | None = None,
          timeout: float = 30) -> dict[str, Any]:
    """Run tests/hbone_client.py inside `pod`; its JSON answer."""
    argv = [sys.executable, "-m", "tests.hbone_client", "--addr", addr, "--ca", str(ca or (cred.ca if cred else ""))]
    if cred is not None:
        argv += ["--cert", str(cred.cert), "--key", str(cred.key)]
    out = lab.run(pod, [*argv, *extra], capture_output=True, text=True, timeout=timeout)
    assert out.stdout.strip(), f"hbone client printed nothing: {out.stderr[-1500:]}"
    doc: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


ECHO_SERVER = r"""
import socket, sys, threading
s = socket.create_server(("0.0.0.0", int(sys.argv[1]))); print("listening", flush=True)
def serve(c):
    with c, c.makefile("rb") as lines:
        for line in lines:  # one answer per line, until the client half-closes
            c.sendall(b"echo " + line.strip() + b" from " + repr(c.getpeername()).encode() + b"\n")
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

ASK = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
    s.sendall(sys.argv[3].encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print(data.decode().strip(), "| peer", s.getpeername()[0])
except OSError as e:
    print("ERR", type(e).__name__)
"""


def ask(lab: Lab, pod: str, ip: str, port: int, text: str = "hello", timeout: float = 3.0) -> str:
    """One request/response over plain TCP from `pod`: 'echo <text> from (peer) | peer <getpeername>' or 'ERR <kind>'."""
    out = lab.run(pod, [sys.executable, "-c", ASK, ip, str(port), text, str(timeout)], capture_output=True,
                  text=True, timeout=timeout + 30)
    return str(out.stdout).strip()
