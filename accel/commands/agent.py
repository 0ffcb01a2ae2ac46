"""`accel agent`: the long-running node daemon."""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from accel.agent import Agent, AgentConfig
from accel.errors import UserError
from accel.sources.base import Source
from accel.state.model import MtlsMode

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="run the node agent (sources -> state model -> BPF maps)")
    p.add_argument("--node", required=True, help="this node's name (spec.nodeName of its pods)")
    p.add_argument("--source", required=True, metavar="kube|manifests:DIR",
                   help="the Kubernetes API (in-cluster or --kubeconfig) or a folder of manifests")
    p.add_argument("--kubeconfig", help="kubeconfig file for --source kube (default: in-cluster, then ~/.kube/config)")
    p.add_argument("--cgroup", type=Path, help="cgroup v2 folder to attach to (default: the unified root)")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/meshaccel"),
                   help="where the agent keeps what must survive a restart (identity numbers)")
    p.add_argument("--instance", help="BPF pin instance name under /sys/fs/bpf/meshaccel (default: the node name)")
    p.add_argument("--maps", choices=("bpf", "pinned", "memory"), default="bpf",
                   help="bpf: compile, pin and attach; pinned: use maps already pinned; memory: no kernel (dry run)")
    p.add_argument("--listen", default="127.0.0.1:9464", help="HOST:PORT for /healthz /readyz /metrics /status")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--default-mtls", choices=[m.value for m in MtlsMode], default="disable",
                   help="mTLS mode for pods with no meshaccel.io/mtls annotation on pod or namespace")
    p.set_defaults(func=run)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--listen {text!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    return host.strip("[]") or "127.0.0.1", int(port)


def make_source(spec: str, kubeconfig: str | None) -> Source:
    if spec == "kube":
        from accel.sources.kube import KubeSource, load_api_client

        return KubeSource(load_api_client(kubeconfig))
    if spec.startswith("manifests:"):
        from accel.sources.manifests import ManifestSource

        folder = Path(spec.removeprefix("manifests:"))
        if not folder.is_dir():
            raise UserError(f"--source {spec}: {folder} is not a folder; create it or fix the path")
        return ManifestSource(folder)
    raise UserError(f"--source {spec!r} is not 'kube' or 'manifests:DIR'")


def open_maps(kind: str, instance: str, cgroup: Path | None) -> tuple[MutableMapping[str, int], Any]:
    """The local endpoint map and the object that owns it (closed on exit)."""
    if kind == "memory":
        return {}, None
    from sockops_bpf import loader, maps

    if kind == "bpf":
        loaded = loader.load(instance, cgroup)
        pinned = maps.open_pinned(loaded.pin_dir)
    else:
        pinned = maps.open_pinned(loader.pin_dir(instance))
    return pinned.local_endpoints, pinned


def run(args: argparse.Namespace) -> int:
    listen = parse_listen(args.listen)
    source = make_source(args.source, args.kubeconfig)
    try:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--state-dir {args.state_dir}: cannot create it ({e.strerror})") from e
    table, owner = open_maps(args.maps, args.instance or args.node, args.cgroup)
    cfg = AgentConfig(node=args.node, state_dir=args.state_dir, listen=listen, trust_domain=args.trust_domain,
                      default_mtls=MtlsMode(args.default_mtls))
    try:
        agent = Agent(cfg, source, table)
    except OSError as e:
        raise UserError(f"--listen {args.listen}: cannot listen ({e.strerror})") from e
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            log.info("event=signal signal=%s action=stop", signal.Signals(signum).name)
            agent.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except OSError as e:
        raise UserError(f"--listen {args.listen}: cannot listen ({e.strerror})") from e
    print(f"accel agent: node={args.node} listening on http://{agent.address}", flush=True)
    agent.wait()
    agent.stop()
    if owner is not None:
        owner.close()  # the pins stay: the kernel keeps the fast path while no agent runs
    return 0
