"""`accel agent`: the long-running node daemon."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Collection, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accel.agent import Agent, AgentConfig
from accel.agent_certs import make_signer
from accel.agent_xds import DEFAULT_PORT_BASE
from accel.errors import UserError
from accel.flows import DEFAULT_CAPACITY
from accel.sources.base import Source
from accel.state.model import Kind, MtlsMode
from certs.manager import CertManager

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
    p.add_argument("--service-cidr", action="append", default=[], metavar="CIDR",
                   help="the cluster's service range (repeat for IPv6): a connect() to an address there "
                        "that is no service fails at once with ECONNREFUSED")
    p.add_argument("--default-mtls", choices=[m.value for m in MtlsMode], default="disable",
                   help="mTLS mode for pods with no meshaccel.io/mtls annotation on pod or namespace")
    p.add_argument("--istio-root-namespace", default="istio-system", metavar="NS",
                   help="Istio's root namespace: AuthorizationPolicy and PeerAuthentication there apply mesh-wide")
    p.add_argument("--node-address", action="append", default=[], metavar="IP",
                   help="an address this node's host-network processes reach its pods from (the node Envoy's "
                        "connections to pods); repeat for IPv6. Known to the kernel as this node (HOST)")
    p.add_argument("--no-splice-loopback", dest="splice_loopback", action="store_false",
                   help="do not splice loopback connections (within a pod, and between apps and the node Envoy)")
    p.add_argument("--splice-guard-pages", type=int, metavar="PAGES",
                   help="TCP memory (pages, as /proc/net/sockstat counts) above which spliced senders move to TCP "
                        "(default: half of net.ipv4.tcp_mem's low mark)")
    c = p.add_argument_group("certificates (off unless a CA is given)")
    c.add_argument("--ca-address", metavar="HOST:PORT", help="the CSR API (`accel ca serve`) to get workload SVIDs from")
    c.add_argument("--node-credential", type=Path, metavar="DIR",
                   help="with --ca-address: node-cert.pem, node-key.pem, root-cert.pem from `accel ca issue-node`")
    c.add_argument("--ca-token-file", type=Path, metavar="FILE",
                   help="in cluster: projected service-account token (audience meshaccel-ca) for the CSR API")
    c.add_argument("--ca-root-file", type=Path, metavar="FILE",
                   help="with --ca-token-file: the CA's root-cert.pem (the meshaccel-ca-root ConfigMap)")
    c.add_argument("--ca-dir", type=Path, metavar="DIR", help="standalone/lab: sign in-process with the CA in this folder")
    c.add_argument("--cert-ttl", type=int, default=86400, metavar="SECONDS", help="leaf validity asked for")
    c.add_argument("--cert-status-file", type=Path, default=Path("/run/meshaccel/certs.json"),
                   help="where the cert manager writes what `accel certs` shows")
    x = p.add_argument_group("xDS (off unless --xds-listen is given)")
    x.add_argument("--xds-listen", metavar="HOST:PORT|unix:PATH", help="serve ADS to this node's Envoy here")
    x.add_argument("--l7-bind", default="127.0.0.1", metavar="IP",
                   help="address Envoy's L7 and inbound mTLS listeners bind to (the node's address in the lab)")
    x.add_argument("--envoy-access-log", metavar="FILE",
                   help="the node Envoy writes one JSON line per tunnel here (peer SPIFFE IDs, bytes, status)")
    x.add_argument("--l7-port-base", type=int, default=DEFAULT_PORT_BASE, metavar="PORT",
                   help="listener ports are assigned from here up, one per L7 service port / inbound pod port")
    f = p.add_argument_group("flows (accel observe)")
    f.add_argument("--flows-kept", type=int, default=DEFAULT_CAPACITY, metavar="N",
                   help=f"keep the last N flows for /flows and `accel observe` (default {DEFAULT_CAPACITY})")
    f.add_argument("--als-listen", metavar="HOST:PORT|unix:PATH",
                   help="receive Envoy's access log here (gRPC ALS): tunnel and L7 flows")
    p.set_defaults(func=run)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--listen {text!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    return host.strip("[]") or "127.0.0.1", int(port)


def make_source(spec: str, kubeconfig: str | None, only: Collection[Kind] | None = None) -> Source:
    """`only`: the kinds to follow from the API (default all); a manifest folder is read whole."""
    if spec == "kube":
        from accel.sources.kube import KubeSource, load_api_client

        return KubeSource(load_api_client(kubeconfig), only=only)
    if spec.startswith("manifests:"):
        from accel.sources.manifests import ManifestSource

        folder = Path(spec.removeprefix("manifests:"))
        if not folder.is_dir():
            raise UserError(f"--source {spec}: {folder} is not a folder; create it or fix the path")
        return ManifestSource(folder)
    raise UserError(f"--source {spec!r} is not 'kube' or 'manifests:DIR'")


@dataclass
class KernelMaps:
    """The pinned maps the agent writes (all None in memory mode) and what to close on exit."""

    local_endpoints: MutableMapping[str, int]
    lb: Any = None
    mesh: Any = None
    policy: Any = None  # .policy (the policy map) and .ipcache (for the compiler's CIDRs)
    owners: list[Any] = field(default_factory=list)
    splice_guard: Callable[[int], None] | None = None  # sets the kernel's splice budget


def open_maps(kind: str, instance: str, cgroup: Path | None) -> KernelMaps:
    if kind == "memory":
        return KernelMaps({})
    from types import SimpleNamespace

    from sockops_bpf import loader, maps

    if kind == "bpf":
        load_in_child(instance, cgroup)
    pdir = loader.pin_dir(instance)
    pinned = maps.open_pinned(pdir)
    lb = maps.open_lb(pdir)
    mesh = maps.open_mesh(pdir)
    pol = maps.open_policy(pdir)
    return KernelMaps(pinned.local_endpoints, lb, mesh, SimpleNamespace(policy=pol.policy, ipcache=mesh.ipcache, denies=pol.denies),
                      [pinned, lb, mesh, pol], pinned.set_splice_budget)


def load_in_child(instance: str, cgroup: Path | None) -> None:
    """Compile and attach in a child process (`accel load`): bcc keeps LLVM mapped (~140 MB) in the
    process that compiled, and the agent, which only needs the pins, should not carry that."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "accel.cli", "load", "--instance", instance]
    if cgroup is not None:
        argv += ["--cgroup", str(cgroup)]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("accel: error:")]
        raise UserError(errors[-1].removeprefix("accel: error: ") if errors
                        else f"loading the eBPF programs failed: {p.stderr.strip()[-500:]}")
    log.info("event=bpf_loaded instance=%s %s", instance, p.stdout.strip())


def parse_xds_listen(text: str | None) -> str | None:
    if text is None or text.startswith("unix:"):
        if text == "unix:":
            raise UserError("--xds-listen unix: needs a path (unix:/run/meshaccel/xds.sock)")
        return text
    try:
        host, port = parse_listen(text)
    except UserError:
        raise UserError(f"--xds-listen {text!r} is not HOST:PORT or unix:PATH (e.g. 127.0.0.1:15010)") from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_addresses(texts: list[str]) -> tuple[str, ...]:
    import ipaddress

    out = []
    for t in texts:
        try:
            out.append(str(ipaddress.ip_address(t)))
        except ValueError:
            raise UserError(f"--node-address {t!r} is not an IP address") from None
    return tuple(out)


def parse_als_listen(text: str | None) -> str | None:
    try:
        return parse_xds_listen(text)
    except UserError:
        raise UserError(f"--als-listen {text!r} is not HOST:PORT or unix:PATH (e.g. unix:/run/meshaccel/als.sock)") \
            from None


def check_l7(args: argparse.Namespace) -> None:
    import ipaddress

    try:
        ipaddress.ip_address(args.l7_bind)
    except ValueError:
        raise UserError(f"--l7-bind {args.l7_bind!r} is not an IP address") from None
    if not 1 <= args.l7_port_base <= 65000:
        raise UserError(f"--l7-port-base {args.l7_port_base} must be between 1 and 65000")


def make_cert_manager(args: argparse.Namespace) -> CertManager | None:
    if args.ca_address is None and args.ca_dir is None:
        if args.node_credential is not None or args.ca_token_file is not None:
            raise UserError("--node-credential and --ca-token-file need --ca-address HOST:PORT")
        return None
    if args.cert_ttl < 60:
        raise UserError(f"--cert-ttl {args.cert_ttl} is too short; give at least 60 seconds")
    signer = make_signer(args.ca_address, args.node_credential, args.ca_dir, args.ca_token_file, args.ca_root_file)
    return CertManager(signer, ttl=args.cert_ttl,
                            status_path=args.cert_status_file)


def run(args: argparse.Namespace) -> int:
    listen = parse_listen(args.listen)
    xds_listen = parse_xds_listen(args.xds_listen)
    als_listen = parse_als_listen(args.als_listen)
    if args.flows_kept < 0:
        raise UserError(f"--flows-kept {args.flows_kept} is negative; give 0 (keep none) or more")
    if args.splice_guard_pages is not None and args.splice_guard_pages < 1:
        raise UserError(f"--splice-guard-pages {args.splice_guard_pages} must be at least 1")
    check_l7(args)
    certs = make_cert_manager(args)
    source = make_source(args.source, args.kubeconfig)
    try:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--state-dir {args.state_dir}: cannot create it ({e.strerror})") from e
    node_addresses = check_addresses(args.node_address)
    km = open_maps(args.maps, args.instance or args.node, args.cgroup)
    cfg = AgentConfig(node=args.node, state_dir=args.state_dir, listen=listen, trust_domain=args.trust_domain,
                      default_mtls=MtlsMode(args.default_mtls), xds_listen=xds_listen, l7_bind=args.l7_bind,
                      l7_port_base=args.l7_port_base, service_cidrs=tuple(args.service_cidr),
                      node_addresses=node_addresses, splice_loopback=args.splice_loopback and args.maps != "memory",
                      envoy_access_log=args.envoy_access_log, flows_kept=args.flows_kept,
                      als_listen=als_listen, istio_root_namespace=args.istio_root_namespace,
                      splice_guard_pages=args.splice_guard_pages)
    try:
        agent = Agent(cfg, source, km.local_endpoints, cert_manager=certs, lb_tables=km.lb, mesh_tables=km.mesh,
                      policy_tables=km.policy, flow_events=km.mesh.pin_dir if km.mesh is not None else None,
                      splice_guard=km.splice_guard)
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
    except RuntimeError as e:  # the xDS server could not bind
        agent.stop()
        raise UserError(f"--xds-listen {args.xds_listen}: {e}") from None
    xds = f" xds={agent.xds.server.address}" if agent.xds is not None else ""
    # One write: with PYTHONUNBUFFERED, print() writes the text and its newline separately, and another
    # thread's log line can land between them (the lab reads this line to find the agent).
    sys.stdout.write(f"accel agent: node={args.node}{xds} listening on http://{agent.address}\n")
    sys.stdout.flush()
    agent.wait()
    agent.stop()
    for owner in km.owners:
        owner.close()  # the pins stay: the kernel keeps the fast path and service LB while no agent runs
    return 0
