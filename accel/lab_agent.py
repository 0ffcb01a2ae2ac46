"""The lab's control plane: a manifest folder for the lab's pods, the real `accel agent` for the
node against it, and (optionally) a real Envoy for the node driven by the agent's xDS server.

Where things run, as on a real node: the agent is a host process (it reaches the pinned maps and
serves /status on the host's 127.0.0.1); Envoy runs in the node's network namespace and cgroup,
so pods reach its listeners on the node address and it reaches the pods over the node bridge.
The two meet over unix sockets, which cross network namespaces: ADS at `xds.sock`, Envoy's admin
at `envoy-admin.sock`.

Everything lives in /run/meshaccel/lab/<id>.agent/ (manifests/, the agent's state, logs, the CA
of `certs=True`, sockets, and procs.json naming the processes). `stop(id)` ends the processes it
started (checked by pid and start time, never by name) and removes the folder; `accel lab down`
calls it before taking the lab down, `down --all` calls `stop_all()`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from accel.envoy import EnvoyConfig, bootstrap, envoy_binary
from accel.errors import UserError
from accel.lab import STATE_DIR, Lab
from accel.state.model import MtlsMode

log = logging.getLogger("meshaccel.lab")

NAMESPACE = "lab"
ROOT = Path(__file__).resolve().parent.parent


def agent_dir(lab_id: str) -> Path:
    return STATE_DIR / f"{lab_id}.agent"


def node_name(lab_id: str) -> str:
    return f"lab-{lab_id}"


def pods_manifest(lab: Lab, mtls: MtlsMode | None = None) -> str:
    """The lab's Namespace and Pods as the agent must see them: lab IPs, this node, one SA per pod."""
    ns: dict[str, Any] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    if mtls is not None:
        ns["metadata"]["annotations"] = {"meshaccel.io/mtls": str(mtls)}
    docs = [ns]
    for p in lab.pods.values():
        docs.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": NAMESPACE, "uid": p.uid, "labels": {"app": p.name}},
            "spec": {"nodeName": node_name(lab.id), "serviceAccountName": p.name},
            "status": {"phase": "Running", "podIPs": [{"ip": p.ipv4}, {"ip": p.ipv6}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
        })
    return yaml.safe_dump_all(docs, sort_keys=False)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def unix_http(path: Path, url: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, str]:
    """One HTTP request over a unix socket (Envoy's admin); (status, body), 0 if nothing answers."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, url)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    except OSError:
        return 0, ""
    finally:
        conn.close()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): pid + this = one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _wait(cond: Any, timeout: float, what: str, logfile: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{what}: the process exited ({proc.returncode}); log {logfile}:\n{_tail(logfile)}")
        if cond():
            return
        time.sleep(0.05)
    raise UserError(f"{what}: not ready after {timeout:.0f}s; log {logfile}:\n{_tail(logfile)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LabAgent:
    """The agent (and optionally Envoy) of one lab node. `up()` / `down()`, or a context manager."""

    def __init__(self, lab: Lab, envoy: bool = False, certs: bool = False, mtls: MtlsMode | None = None,
                 cert_ttl: int = 86400) -> None:
        self.lab = lab
        self.envoy = envoy
        self.certs = certs
        self.mtls = mtls
        self.cert_ttl = cert_ttl
        self.dir = agent_dir(lab.id)
        self.node = node_name(lab.id)
        self.manifests = self.dir / "manifests"
        self.xds_socket = self.dir / "xds.sock"
        self.admin_socket = self.dir / "envoy-admin.sock"
        self.url = ""
        self._procs: dict[str, dict[str, Any]] = {}

    # --- life cycle ---------------------------------------------------------------------------
    def up(self) -> LabAgent:
        if self.dir.exists():
            raise UserError(f"lab {self.lab.id} already runs an agent ({self.dir}); `accel lab down --id {self.lab.id}`")
        self.manifests.mkdir(parents=True, mode=0o700)
        try:
            (self.manifests / "lab-pods.yaml").write_text(pods_manifest(self.lab, self.mtls))
            if self.certs:
                self._init_ca()
            self._start_agent()
            if self.envoy:
                self._start_envoy()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        stop(self.lab.id)

    def __enter__(self) -> LabAgent:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _init_ca(self) -> None:
        from certs.ca import CertificateAuthority
        from certs.store import FileStore

        FileStore(self.dir / "ca").save(CertificateAuthority.create_root().material)

    def _spawn(self, role: str, argv: list[str], logfile: Path) -> subprocess.Popen[bytes]:
        with open(logfile, "ab") as out:
            # A session of its own: `accel lab up` returns while these keep running until `lab down`.
            proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
        self._procs[role] = {"pid": proc.pid, "start": _start_time(proc.pid), "argv": argv}
        self._save()
        return proc

    def _start_agent(self) -> None:
        argv = [sys.executable, "-m", "accel.cli", "agent", "--node", self.node,
                "--source", f"manifests:{self.manifests}", "--state-dir", str(self.dir / "state"),
                "--listen", "127.0.0.1:0", "--xds-listen", f"unix:{self.xds_socket}",
                "--l7-bind", self.lab.node_ipv4, "--cert-status-file", str(self.dir / "certs.json")]
        argv += ["--maps", "pinned", "--instance", self.lab.instance] if self.lab.attach else ["--maps", "memory"]
        if self.certs:
            argv += ["--ca-dir", str(self.dir / "ca"), "--cert-ttl", str(self.cert_ttl)]
        logfile = self.dir / "agent.log"
        proc = self._spawn("agent", argv, logfile)
        found: list[str] = []

        def listening() -> bool:
            m = re.search(r"listening on (http://\S+)", _tail(logfile, 200))
            if m:
                found.append(m.group(1))
            return bool(m)

        _wait(listening, 60, "accel agent", logfile, proc)
        self.url = found[0]
        self._procs["agent"]["url"] = self.url
        self._save()
        _wait(lambda: self._get("/readyz")[0] == 200, 60, "accel agent initial sync", logfile, proc)

    def _start_envoy(self) -> None:
        boot = bootstrap(EnvoyConfig(node_id=self.node, xds_address=f"unix:{self.xds_socket}"))
        boot["admin"] = {"address": {"pipe": {"path": str(self.admin_socket)}}}
        (self.dir / "envoy.json").write_text(json.dumps(boot))
        argv = self.lab.node_command([envoy_binary(), "-c", str(self.dir / "envoy.json"), "--disable-hot-restart",
                                      "--concurrency", "1", "--drain-time-s", "2", "-l", "warning",
                                      "--log-path", str(self.dir / "envoy.log")])
        proc = self._spawn("envoy", argv, self.dir / "envoy.out")
        _wait(lambda: self.envoy_admin("/ready")[0] == 200, 60, "envoy (initial xDS config)",
              self.dir / "envoy.log", proc)

    def _save(self) -> None:
        doc = {"node": self.node, "url": self.url, "manifests": str(self.manifests), "procs": self._procs,
               "envoy_admin": str(self.admin_socket) if self.envoy else None}
        (self.dir / "procs.json").write_text(json.dumps(doc, indent=1))

    # --- using it -----------------------------------------------------------------------------
    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError):
            return 0, ""

    def status(self) -> dict[str, Any]:
        code, body = self._get("/status")
        if code != 200:
            raise RuntimeError(f"agent {self.url}/status answered {code}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def refresh_certs(self) -> int:
        req = urllib.request.Request(self.url + "/certs/refresh", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(json.loads(r.read())["refreshing"])

    def envoy_admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        return unix_http(self.admin_socket, path, method)

    def config_dump(self, resource: str = "") -> dict[str, Any]:
        code, body = self.envoy_admin("/config_dump" + (f"?resource={resource}" if resource else ""))
        if code != 200:
            raise RuntimeError(f"envoy admin /config_dump answered {code}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def pid(self, role: str) -> int | None:
        p = self._procs.get(role)
        return int(p["pid"]) if p else None


def _end(pid: int, start: str | None, timeout: float = 10.0) -> None:
    """SIGTERM the process if it is still the one we started, SIGKILL after `timeout`."""
    if start is None or _start_time(pid) != start:
        return  # gone, or the pid now belongs to someone else
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our child when started by this process: reap it
        if _start_time(pid) != start:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def stop(lab_id: str) -> bool:
    """End the agent and Envoy of one lab and remove its folder; False if it ran none."""
    d = agent_dir(lab_id)
    if not d.exists():
        return False
    try:
        procs = json.loads((d / "procs.json").read_text())["procs"]
    except (OSError, ValueError, KeyError):
        procs = {}
    for role in ("envoy", "agent"):  # Envoy first: it would only retry a stopped xDS server
        p = procs.get(role)
        if p:
            _end(int(p["pid"]), p.get("start"))
    shutil.rmtree(d, ignore_errors=True)
    log.info("lab agent stopped id=%s", lab_id)
    return True


def stop_all() -> list[str]:
    ids = sorted(p.name.removesuffix(".agent") for p in STATE_DIR.glob("*.agent")) if STATE_DIR.is_dir() else []
    return [i for i in ids if stop(i)]
