"""The lab's control plane: a manifest folder for the lab's pods, the real `accel agent` for each
node against it, and (optionally) a real Envoy per node driven by that node's agent's xDS server.

Where things run, as on a real node: the agent is a host process (it reaches the pinned maps and
serves /status on the host's 127.0.0.1); Envoy runs in the node's network namespace and cgroup,
so pods reach its listeners on the node address and it reaches the pods over the node bridge.
The two meet over unix sockets, which cross network namespaces: ADS at `xds.sock`, Envoy's admin
at `envoy-admin.sock`.

Everything lives in /run/meshaccel/lab/<id>.agent/ for the first node (manifests/, the agent's
state, logs, the CA of `certs=True`, sockets, and procs.json naming the processes) and in
<id>.<node>.agent/ for the others, whose agents read the first node's manifest folder and CA: one
cluster, one trust domain. `stop(id)` ends the processes it started (checked by pid and start time,
never by name) and removes the folders; `accel lab down` calls it before taking the lab down,
`down --all` calls `stop_all()`.
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from accel.envoy import EnvoyConfig, bootstrap, envoy_binary
from accel.errors import UserError
from accel.lab import STATE_DIR, Lab
from accel.state.model import MTLS_ANNOTATION, MtlsMode

log = logging.getLogger("meshaccel.lab")

NAMESPACE = "lab"
ROOT = Path(__file__).resolve().parent.parent


def agent_dir(lab_id: str, node: str = "node1") -> Path:
    return STATE_DIR / (f"{lab_id}.agent" if node == "node1" else f"{lab_id}.{node}.agent")


def node_name(lab_id: str, node: str = "node1") -> str:
    """The Kubernetes node name of a lab node (spec.nodeName of its pods)."""
    return f"lab-{lab_id}" if node == "node1" else f"lab-{lab_id}-{node}"


PODS_FILE = "lab-pods.yaml"


def pods_manifest(lab: Lab, mtls: MtlsMode | None = None, annotations: Mapping[str, Mapping[str, str]] | None = None,
                  labels: Mapping[str, Mapping[str, str]] | None = None,
                  service_accounts: Mapping[str, str | None] | None = None,
                  namespaces: Mapping[str, str] | None = None,
                  namespace_labels: Mapping[str, Mapping[str, str]] | None = None,
                  ports: Mapping[str, Sequence[tuple[str, int]]] | None = None) -> str:
    """The lab's Namespaces and Pods as the agents must see them: lab IPs, their nodes, one SA per pod
    (named after it, unless `service_accounts` says otherwise; None: no serviceAccountName at all).
    By pod name: `namespaces` (default "lab"), `annotations` and `labels` added, container `ports`
    (name, number). `mtls` annotates every namespace; `namespace_labels` labels them."""
    docs: list[dict[str, Any]] = []
    for name in sorted({NAMESPACE, *(namespaces or {}).values()}):
        meta: dict[str, Any] = {"name": name, "labels": dict((namespace_labels or {}).get(name, {}))}
        if mtls is not None:
            meta["annotations"] = {MTLS_ANNOTATION: str(mtls)}
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
    for p in lab.pods.values():
        meta = {"name": p.name, "namespace": (namespaces or {}).get(p.name, NAMESPACE), "uid": p.uid,
                "labels": {"app": p.name, **(labels or {}).get(p.name, {})}}
        if annotations and p.name in annotations:
            meta["annotations"] = dict(annotations[p.name])
        spec: dict[str, Any] = {"nodeName": node_name(lab.id, p.node),
                                "containers": [{"name": "app", "ports": [
                                    {"name": n, "containerPort": port, "protocol": "TCP"}
                                    for n, port in (ports or {}).get(p.name, ())]}]}
        sa = (service_accounts or {}).get(p.name, p.name)
        if sa is not None:
            spec["serviceAccountName"] = sa
        docs.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": meta,
            "spec": spec,
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
                 cert_ttl: int = 86400, node: str = "node1", ca_serve: bool = False,
                 kubeconfig: Path | None = None, agent_args: Sequence[str] = ()) -> None:
        """`certs`: each agent signs its pods' SVIDs with the lab CA in-process (--ca-dir), or with
        `ca_serve` asks `accel ca serve` (run by node1) over the CSR API with a node credential.
        `kubeconfig`: watch that API server (e.g. accel.kubefake's) instead of the manifest folder;
        `agent_args`: more `accel agent` options."""
        self.lab = lab
        self.kubeconfig = kubeconfig
        self.agent_args = tuple(agent_args)
        self.ca_serve = ca_serve
        self.lab_node = lab.node(node)
        self.envoy = envoy
        self.certs = certs
        self.mtls = mtls
        self.cert_ttl = cert_ttl
        self.dir = agent_dir(lab.id, node)
        self.node = node_name(lab.id, node)
        # One cluster: every node's agent reads the first node's manifest folder (and signs with its CA).
        self.manifests = agent_dir(lab.id) / "manifests"
        self.ca_dir = agent_dir(lab.id) / "ca"
        self.first = node == "node1"
        self.xds_socket = self.dir / "xds.sock"
        self.admin_socket = self.dir / "envoy-admin.sock"
        self.access_log = self.dir / "envoy-access.log"
        self.url = ""
        self._procs: dict[str, dict[str, Any]] = {}

    # --- life cycle ---------------------------------------------------------------------------
    def up(self) -> LabAgent:
        if self.dir.exists():
            raise UserError(f"lab {self.lab.id} already runs an agent ({self.dir}); `accel lab down --id {self.lab.id}`")
        if not self.first and not self.manifests.is_dir():
            raise UserError(f"start the agent of node1 of lab {self.lab.id} first (it owns the manifest folder)")
        self.dir.mkdir(parents=True, mode=0o700)
        self.lab.stop_guard()  # the agent guards the node's splices from now on
        try:
            if self.first:
                self.manifests.mkdir(mode=0o700)
                (self.manifests / PODS_FILE).write_text(pods_manifest(self.lab, self.mtls))
                if self.certs:
                    self._init_ca()
                if self.certs and self.ca_serve:
                    self.start_ca()
            if self.certs and self.ca_serve:
                self._issue_node_credential()
            self.start_agent()
            if self.envoy:
                self._start_envoy()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        _stop_dir(self.dir)

    def __enter__(self) -> LabAgent:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _init_ca(self) -> None:
        from certs.ca import CertificateAuthority
        from certs.store import FileStore

        FileStore(self.ca_dir).save(CertificateAuthority.create_root().material)

    # --- the CSR API (ca_serve) ---------------------------------------------------------------
    @property
    def ca_address_file(self) -> Path:
        return agent_dir(self.lab.id) / "ca-address"

    def start_ca(self) -> None:
        """`accel ca serve` for the lab (node1 runs it): the CSR API the agents ask for SVIDs."""
        logfile = self.dir / "ca.log"
        # A restart keeps the address the agents were given.
        listen = self.ca_address_file.read_text().strip() if self.ca_address_file.exists() else "127.0.0.1:0"
        argv = [sys.executable, "-m", "accel.cli", "ca", "serve", "--dir", str(self.ca_dir), "--listen", listen,
                "--pods", f"manifests:{self.manifests}"]
        proc = self._spawn("ca", argv, logfile, fresh_log=True)
        found: list[str] = []

        def listening() -> bool:
            m = re.search(r"listening on (127\.0\.0\.1:\d+)\n", _tail(logfile, 200) + "\n")
            if m:
                found.append(m.group(1))
            return bool(m)

        _wait(listening, 60, "accel ca serve", logfile, proc)
        self.ca_address_file.write_text(found[0])

    def _issue_node_credential(self) -> None:
        argv = [sys.executable, "-m", "accel.cli", "ca", "issue-node", self.node, "--out",
                str(self.dir / "node-credential"), "--dir", str(self.ca_dir)]
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            raise UserError(f"accel ca issue-node {self.node}: {p.stderr.strip()[-500:]}")

    def kill(self, role: str) -> None:
        """SIGKILL one of the processes this node runs (agent, envoy, ca): a crash, for tests."""
        p = self._procs.get(role)
        if p and _start_time(int(p["pid"])) == p.get("start"):
            os.kill(int(p["pid"]), signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(p["pid"]), 0)

    def _spawn(self, role: str, argv: list[str], logfile: Path, fresh_log: bool = False) -> subprocess.Popen[bytes]:
        if fresh_log and logfile.exists():  # a restart: keep the old log beside, read only the new one
            logfile.rename(logfile.with_suffix(f".{int(time.time() * 1000)}.log"))
        with open(logfile, "ab") as out:
            # A session of its own: `accel lab up` returns while these keep running until `lab down`.
            proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
        self._procs[role] = {"pid": proc.pid, "start": _start_time(proc.pid), "argv": argv}
        self._save()
        return proc

    def start_agent(self) -> None:
        """Start (or, after `kill("agent")`, restart) this node's agent and wait until it has synced."""
        n = self.lab_node
        argv = [sys.executable, "-m", "accel.cli", "agent", "--node", self.node,
                *(["--source", "kube", "--kubeconfig", str(self.kubeconfig)] if self.kubeconfig
                  else ["--source", f"manifests:{self.manifests}"]), "--state-dir", str(self.dir / "state"),
                "--listen", "127.0.0.1:0", "--xds-listen", f"unix:{self.xds_socket}",
                "--l7-bind", n.ipv4, "--node-address", n.ipv4, "--node-address", n.ipv6,
                "--cert-status-file", str(self.dir / "certs.json"), "--envoy-access-log", str(self.access_log),
                "--als-listen", f"unix:{self.dir / 'als.sock'}"]
        argv += ["--maps", "pinned", "--instance", n.instance] if self.lab.attach else ["--maps", "memory"]
        if self.certs and self.ca_serve:
            argv += ["--ca-address", self.ca_address_file.read_text().strip(), "--node-credential",
                     str(self.dir / "node-credential"), "--cert-ttl", str(self.cert_ttl)]
        elif self.certs:
            argv += ["--ca-dir", str(self.ca_dir), "--cert-ttl", str(self.cert_ttl)]
        argv += self.agent_args
        logfile = self.dir / "agent.log"
        proc = self._spawn("agent", argv, logfile, fresh_log=True)
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
                                      "--log-path", str(self.dir / "envoy.log")], node=self.lab_node.name)
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

    def tunnels(self) -> list[dict[str, Any]]:
        """What this node's Envoy logged so far, one dict per tunnel or capture (see meshxds.resources.MESH_LOG_FIELDS)."""
        try:
            lines = self.access_log.read_text().splitlines()
        except OSError:
            return []
        return [json.loads(ln) for ln in lines if ln.strip()]

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
    """End the agents and Envoys of one lab (every node) and remove their folders; False if it ran none."""
    dirs = [d for d in (agent_dir(lab_id), *STATE_DIR.glob(f"{lab_id}.node*.agent")) if d.exists()]
    for d in sorted(dirs, reverse=True):  # node1's last: the others read its manifest folder
        _stop_dir(d)
    if dirs:
        log.info("lab agent stopped id=%s nodes=%d", lab_id, len(dirs))
    return bool(dirs)


def _stop_dir(d: Path) -> None:
    if not d.exists():
        return
    try:
        procs = json.loads((d / "procs.json").read_text())["procs"]
    except (OSError, ValueError, KeyError):
        procs = {}
    for role in ("envoy", "agent", "ca"):  # Envoy first: it would only retry a stopped xDS server
        p = procs.get(role)
        if p:
            _end(int(p["pid"]), p.get("start"))
    shutil.rmtree(d, ignore_errors=True)


def stop_all() -> list[str]:
    ids = sorted({p.name.split(".", 1)[0] for p in STATE_DIR.glob("*.agent")}) if STATE_DIR.is_dir() else []
    return [i for i in ids if stop(i)]


class LabCluster:
    """The control plane of every node of a lab: one agent (and Envoy) per node on one manifest folder
    and one CA. A context manager; `agents[node]` are the LabAgents, `manifests` the cluster's folder."""

    def __init__(self, lab: Lab, envoy: bool = False, certs: bool = False, mtls: MtlsMode | None = None,
                 cert_ttl: int = 86400, ca_serve: bool = False) -> None:
        self.lab = lab
        self.agents = {n: LabAgent(lab, envoy, certs, mtls, cert_ttl, node=n, ca_serve=ca_serve) for n in lab.nodes}
        self.manifests = self.agents["node1"].manifests

    def up(self) -> LabCluster:
        try:
            for a in self.agents.values():
                a.up()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        stop(self.lab.id)

    def __enter__(self) -> LabCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def agent_of(self, pod: str) -> LabAgent:
        return self.agents[self.lab.pod(pod).node]

    def set_pods(self, **shape: Any) -> None:
        """Rewrite the lab's Namespaces and Pods (what the agents see of them), e.g. to change enrollment;
        `shape`: pods_manifest's keyword arguments."""
        write_pods(self.lab, self.manifests, **shape)


def write_pods(lab: Lab, manifests: Path, **shape: Any) -> None:
    """The lab's Namespaces and Pods into a manifest folder, shaped by pods_manifest's keyword arguments."""
    tmp = manifests / f".{PODS_FILE}.tmp"
    tmp.write_text(pods_manifest(lab, **shape))
    tmp.rename(manifests / PODS_FILE)  # the folder source never reads half a file
