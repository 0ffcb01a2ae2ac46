"""Run accel.lab_traffic in lab pods and check that both directions arrived bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

from accel.lab import Lab


@dataclass
class Traffic:
    server: subprocess.Popen[str]
    client: subprocess.Popen[str] | None = None


def start(lab: Lab, server_pod: str, client_pod: str, host: str, port: int, conns: int, msgs: int,
          max_size: int, half_close: bool = False, pause: float = 0.0, seed: int = 7,
          server_in_pod_cgroup: bool = True) -> Traffic:
    common = ["--host", host, "--port", str(port), "--conns", str(conns), "--msgs", str(msgs),
              "--max-size", str(max_size), "--pause", str(pause)] + (["--half-close"] if half_close else [])
    server = lab.popen(server_pod, [sys.executable, "-m", "accel.lab_traffic", "serve", *common],
                       in_cgroup=server_in_pod_cgroup, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert server.stdout is not None
    first = server.stdout.readline()  # the server says when it listens
    assert "listening" in first, f"server did not start: {first!r} {server.stderr.read() if server.stderr else ''}"
    t = Traffic(server)
    t.client = lab.popen(client_pod, [sys.executable, "-m", "accel.lab_traffic", "connect", *common,
                                      "--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    return t


def established(lab: Lab, pod: str, port: int) -> int:
    """Established TCP connections a server on `port` in `pod` accepted (the server's side is
    established last: its count says the whole handshake is done)."""
    out = lab.run(pod, ["ss", "-Htn", "state", "established", f"sport = :{port}"],
                  in_cgroup=False, capture_output=True, text=True, check=True)
    return len(out.stdout.splitlines())


def finish(t: Traffic, conns: int, timeout: float = 240) -> int:
    """Wait for both sides; assert every connection's bytes match both ways. Returns bytes moved."""
    assert t.client is not None
    deadline = time.monotonic() + timeout
    try:
        c_out, c_err = t.client.communicate(timeout=timeout)
        s_out, s_err = t.server.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in (t.client, t.server):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert t.client.returncode == 0, f"client failed: {c_err[-2000:]}"
    assert t.server.returncode == 0, f"server failed: {s_err[-2000:]}"
    client = {d["id"]: d for d in map(json.loads, c_out.splitlines())}
    server = {d["id"]: d for d in map(json.loads, s_out.splitlines()) if "id" in d}
    assert sorted(client) == list(range(conns)), f"client finished {len(client)}/{conns} connections"
    assert sorted(server) == list(range(conns)), f"server finished {len(server)}/{conns} connections"
    moved = 0
    for i in range(conns):
        c, s = client[i], server[i]
        assert c["sent_bytes"] == s["recv_bytes"] and c["sent_sha256"] == s["recv_sha256"], f"conn {i} client->server"
        assert s["sent_bytes"] == c["recv_bytes"] and s["sent_sha256"] == c["recv_sha256"], f"conn {i} server->client"
        moved += c["sent_bytes"] + s["sent_bytes"]
    return moved
