"""`accel ca init`, `accel ca rotate-root`, `accel ca issue-node`, `accel ca serve`, `accel certs`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from accel.errors import UserError
from accel.state.model import Kind

log = logging.getLogger(__name__)
DEFAULT_CA_DIR = "/etc/meshaccel/ca"
DEFAULT_STATUS = "/run/meshaccel/certs.json"
# What the CA's authorization needs to know (which pods run where, with which service account): its RBAC
# grants reading these and nothing else of the cluster.
CA_KINDS = (Kind.NAMESPACE, Kind.POD)


def register(sub: Any) -> None:
    ca = sub.add_parser("ca", help="the mesh certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)

    init = ca_sub.add_parser("init", help="create a self-signed root CA")
    _store_args(init)
    init.add_argument("--trust-domain", default="cluster.local")
    init.add_argument("--key-type", choices=["ec-p256", "rsa-3072"], default="ec-p256")
    init.add_argument("--validity-days", type=int, default=3650)
    init.add_argument("--force", action="store_true", help="replace an existing CA (every issued cert stops verifying)")
    init.add_argument("--if-missing", action="store_true",
                      help="keep an existing CA and exit 0 (for an init container that runs on every start)")
    init.set_defaults(func=cmd_init)

    rot = ca_sub.add_parser(
        "rotate-root",
        help="rotate the self-signed root in three steps: prepare (new root joins the bundle), "
        "activate (new root signs), finish (old root dropped, once its leaves expired)",
    )
    _store_args(rot)
    rot.add_argument("step", choices=["prepare", "activate", "finish"])
    rot.add_argument("--key-type", choices=["ec-p256", "rsa-3072"], default="ec-p256")
    rot.set_defaults(func=cmd_rotate)

    node = ca_sub.add_parser("issue-node", help="issue a node agent's credential for the CSR API (lab/standalone)")
    _store_args(node)
    node.add_argument("node")
    node.add_argument("--out", required=True, help="folder for node-cert.pem and node-key.pem (mode 0600)")
    node.add_argument("--days", type=int, default=30)
    node.set_defaults(func=cmd_issue_node)

    srv = ca_sub.add_parser("serve", help="serve the CSR API (IstioCertificateService/CreateCertificate) until stopped")
    _store_args(srv)
    srv.add_argument("--listen", default="127.0.0.1:15012", help="HOST:PORT for the gRPC CSR API (TLS)")
    srv.add_argument("--pods", required=True, metavar="kube|manifests:DIR",
                     help="where to learn which pods run on which node (authorization): the Kubernetes API "
                          "or a manifest folder (standalone, the lab)")
    srv.add_argument("--token-service-account", action="append", default=[], metavar="NAMESPACE/NAME",
                     help="in cluster: accept bearer tokens of this service account (the agent's), checked "
                          "with TokenReview; repeat for several")
    srv.add_argument("--token-audience", action="append", default=[], help="audience the tokens must carry")
    srv.add_argument("--dns-name", action="append", default=[],
                     help="DNS name in the serving certificate (default meshaccel-ca.meshaccel-system.svc)")
    srv.add_argument("--root-configmap", metavar="NAMESPACE/NAME",
                     help="in cluster: publish the trust bundle (root-cert.pem) in this ConfigMap for node agents")
    srv.add_argument("--sync-timeout", type=float, default=30.0,
                     help="seconds to wait for the first full list of pods before serving anyway")
    srv.set_defaults(func=cmd_serve)

    certs = sub.add_parser("certs", help="workload certificates on this node: identity, serial, expiry, next refresh")
    certs.add_argument("--status-file", default=DEFAULT_STATUS, help="written by the running agent's cert manager")
    certs.add_argument("--agent", metavar="URL", help="read the running agent's /status (e.g. http://127.0.0.1:9464)")
    certs.add_argument("--ca-dir", help="standalone: issue now from this CA folder instead of reading the agent")
    certs.add_argument("--identity", action="append", default=[], help="with --ca-dir: SPIFFE ID to issue (repeat)")
    certs.add_argument("--json", action="store_true")
    certs.set_defaults(func=cmd_certs)


def _store_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dir", default=None, help=f"standalone: CA folder (default {DEFAULT_CA_DIR})")
    g.add_argument("--secret", metavar="NAMESPACE/NAME", help="keep the CA in this Kubernetes Secret")
    p.add_argument("--kubeconfig", help="with --secret: kubeconfig file (default: in-cluster or ~/.kube/config)")


def _store(args: argparse.Namespace) -> Any:
    from certs.store import FileStore, SecretStore

    if args.secret:
        ns, _, name = args.secret.partition("/")
        if not ns or not name:
            raise UserError(f"--secret {args.secret!r} must be NAMESPACE/NAME")
        from kubernetes import client

        _kube_config(args.kubeconfig)
        return SecretStore(client.CoreV1Api(), ns, name)
    return FileStore(args.dir or DEFAULT_CA_DIR)


def _load_ca(store: Any) -> Any:
    from certs.ca import CaError, CertificateAuthority

    try:
        material = store.load()
        if material is None:
            raise UserError(f"no CA in {store.describe()}; run `accel ca init` first")
        return CertificateAuthority(material)
    except CaError as e:
        raise UserError(f"{store.describe()}: {e}") from None


def _save(store: Any, material: Any) -> None:
    try:
        store.save(material)
    except OSError as e:
        raise UserError(f"cannot write {store.describe()}: {e.strerror}; run as root or pick another --dir") from None


def _describe_root(ca: Any) -> str:
    from cryptography.hazmat.primitives import hashes

    root = ca.chain[-1]
    return (
        f"root {root.fingerprint(hashes.SHA256()).hex()[:16]} valid until {root.not_valid_after_utc:%Y-%m-%d}, "
        f"trust domain {ca.trust_domain}, {len(ca.roots)} root(s) trusted"
    )


def cmd_init(args: argparse.Namespace) -> int:
    from certs.ca import DAY, CaError, CertificateAuthority
    from certs.spiffe import SpiffeIdError

    store = _store(args)
    try:
        existing = store.load()
    except Exception:
        existing = None
    if existing is not None and args.if_missing and not args.force:
        print(f"kept the CA in {store.describe()}")
        return 0
    if existing is not None and not args.force:
        raise UserError(f"{store.describe()} already holds a CA; use `accel ca rotate-root` or --force to replace it")
    if args.validity_days < 1:
        raise UserError("--validity-days must be at least 1")
    try:
        ca = CertificateAuthority.create_root(args.trust_domain, args.key_type, args.validity_days * DAY)
    except (CaError, SpiffeIdError) as e:
        raise UserError(str(e)) from None
    _save(store, ca.material)
    print(f"created CA in {store.describe()}: {_describe_root(ca)}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from certs.ca import CaError

    store = _store(args)
    ca = _load_ca(store)
    try:
        if args.step == "prepare":
            new = ca.rotation_prepared(args.key_type)
        elif args.step == "activate":
            new = ca.rotation_activated()
        else:
            new = ca.rotation_finished()
    except CaError as e:
        raise UserError(str(e)) from None
    _save(store, new.material)
    print(f"rotate-root {args.step}: {_describe_root(new)}")
    return 0


def cmd_issue_node(args: argparse.Namespace) -> int:
    from certs.ca import DAY
    from certs.keys import generate_key, key_pem
    from certs.spiffe import SpiffeIdError
    from certs.store import write_atomic

    ca = _load_ca(_store(args))
    key = generate_key("ec-p256")
    try:
        chain = ca.issue_node_cert(args.node, key.public_key(), args.days * DAY)
    except SpiffeIdError as e:
        raise UserError(f"node name: {e}") from None
    out = os.path.abspath(args.out)
    os.makedirs(out, mode=0o700, exist_ok=True)
    write_atomic(Path(out) / "node-cert.pem", "".join(chain), 0o644)
    write_atomic(Path(out) / "node-key.pem", key_pem(key), 0o600)
    write_atomic(Path(out) / "root-cert.pem", ca.trust_bundle_pem(), 0o644)
    print(f"node credential for {args.node} in {out} (valid {args.days} days)")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from certs.manager import CertStatus, load_status

    rows: list[CertStatus]
    if args.ca_dir:
        rows = _issue_standalone(args)
    elif args.agent:
        rows = _from_agent(args.agent)
    else:
        try:
            rows = load_status(args.status_file)
        except FileNotFoundError:
            raise UserError(f"{args.status_file} not found: is the agent running? (standalone: --ca-dir)") from None
        except (ValueError, KeyError) as e:
            raise UserError(f"{args.status_file} is not a cert manager status file: {e}") from None
    if args.json:
        print(json.dumps([{f: getattr(r, f) for f in r.__dataclass_fields__} for r in rows]))
        return 0
    now = time.time()
    print(f"{'IDENTITY':<50} {'SERIAL':<18} {'EXPIRES':<22} {'NEXT REFRESH':<22} STATUS")
    for r in rows:
        status = "ok" if r.not_after and r.not_after > now else "no valid cert"
        if r.failures:
            status += f", {r.failures} failures: {r.last_error}"
        print(f"{r.spiffe_id:<50} {(r.serial or '-')[:16]:<18} {_when(r.not_after):<22} {_when(r.next_refresh):<22} {status}")
    return 0


def _from_agent(url: str) -> list[Any]:
    from certs.manager import CertStatus

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=5) as r:
            doc = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"--agent {url}: no agent status there ({e}); is `accel agent` running?") from None
    certs = doc.get("certs") if isinstance(doc, dict) else None
    if not isinstance(certs, dict):
        raise UserError(f"--agent {url}: the agent runs no cert manager (start it with --ca-dir or --ca-address)")
    return [CertStatus(str(c["spiffe_id"]), c.get("serial"), c.get("not_after"), float(c["next_refresh"]),
                       int(c.get("failures", 0)), c.get("last_error")) for c in certs["certificates"]]


class _StateSink:
    """Feeds the CA's own state model from a source: the CA's view of which pods run where."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.synced_event = threading.Event()
        self._lock = threading.Lock()

    def event(self, ev: Any) -> None:
        with self._lock:
            self.state.apply([ev])

    def synced(self) -> None:
        with self._lock:
            self.state.apply([], synced=True)
        self.synced_event.set()

    def problem(self, reason: str, message: str) -> None:
        log.warning("event=problem reason=%s %s", reason, message)

    def stat(self, name: str, kind: str) -> None:
        pass


def pods_on_node(state: Any) -> Any:
    """The authorization view: SPIFFE IDs of the running pods scheduled on a node."""
    from accel.reconcile import on_node
    from certs.spiffe import SpiffeId, SpiffeIdError

    def lookup(node: str) -> set[Any]:
        out = set()
        for w in state.workloads():
            if on_node(w, node):
                try:
                    out.add(SpiffeId.parse(w.identity.spiffe_id))
                except SpiffeIdError:
                    continue
        return out

    return lookup


def cmd_serve(args: argparse.Namespace) -> int:
    from accel.commands.agent import make_source, parse_listen
    from accel.state.store import ClusterState
    from certs.api import CA_SERVER_NAME, CertificateService, serve, server_credentials

    host, port = parse_listen(args.listen)
    store = _store(args)
    ca = _load_ca(store)
    verifier = None
    if args.token_service_account:
        from kubernetes import client

        from certs.auth import TokenReviewVerifier

        if args.secret is None:  # _store loaded Kubernetes credentials only for --secret
            _kube_config(args.kubeconfig)
        verifier = TokenReviewVerifier(client.AuthenticationV1Api(), args.token_service_account, args.token_audience)
    source = make_source(args.pods, args.kubeconfig, only=CA_KINDS)
    state = ClusterState(trust_domain=ca.trust_domain)
    sink = _StateSink(state)
    stop = threading.Event()
    threading.Thread(target=source.run, args=(sink, stop), name="ca-pods", daemon=True).start()
    if not sink.synced_event.wait(args.sync_timeout):
        log.warning("event=pods_not_synced seconds=%s: serving; nodes get nothing until the pods are listed",
                    args.sync_timeout)
    service = CertificateService(ca, pods_on_node(state), verifier)
    publish = _root_publisher(args)
    publish(ca)
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server, bound = serve(service, addr, server_credentials(ca, args.dns_name or (CA_SERVER_NAME,)))
    except (OSError, RuntimeError) as e:
        stop.set()
        raise UserError(f"--listen {args.listen}: cannot listen ({e})") from None

    reload = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    signal.signal(signal.SIGINT, lambda _s, _f: stop.set())
    signal.signal(signal.SIGHUP, lambda _s, _f: reload.set())
    pods = sum(1 for _ in state.workloads())
    # One write (see the agent's start line: PYTHONUNBUFFERED splits print() in two).
    sys.stdout.write(f"accel ca serve: {_describe_root(ca)}; {pods} pods known; listening on {host}:{bound}\n")
    sys.stdout.flush()
    while not stop.wait(0.5):
        if reload.is_set():  # SIGHUP: the CA folder/Secret changed (root rotation); no restart needed
            reload.clear()
            try:
                service.set_ca(_load_ca(store))
                publish(service.ca)
                log.info("event=ca_reloaded %s", _describe_root(service.ca))
            except UserError as e:
                log.error("event=ca_reload_failed error=%r (still signing with the previous CA)", str(e))
    server.stop(2).wait(5)
    return 0


def _root_publisher(args: argparse.Namespace) -> Any:
    """A function that writes the CA's trust bundle to --root-configmap (a no-op without it): node
    agents mount that ConfigMap to authenticate the CSR API, the way Istio spreads istio-ca-root-cert."""
    if not args.root_configmap:
        return lambda ca: None
    ns, _, name = args.root_configmap.partition("/")
    if not ns or not name:
        raise UserError(f"--root-configmap {args.root_configmap!r} must be NAMESPACE/NAME")
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    _kube_config(args.kubeconfig)
    core = client.CoreV1Api()

    def publish(ca: Any) -> None:
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, namespace=ns),
                                  data={"root-cert.pem": ca.trust_bundle_pem()})
        try:
            core.replace_namespaced_config_map(name, ns, body)
        except ApiException as e:
            if e.status != 404:
                log.error("event=root_publish_failed configmap=%s status=%s", args.root_configmap, e.status)
                return
            core.create_namespaced_config_map(ns, body)
        log.info("event=root_published configmap=%s", args.root_configmap)

    return publish


def _kube_config(kubeconfig: str | None) -> None:
    from kubernetes import config

    try:
        if kubeconfig:
            config.load_kube_config(kubeconfig)
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
    except (config.ConfigException, OSError) as e:
        raise UserError(f"cannot load Kubernetes credentials: {e}; pass --kubeconfig") from None


def _issue_standalone(args: argparse.Namespace) -> list[Any]:
    from certs.manager import CertManager
    from certs.signer import LocalSigner
    from certs.spiffe import SpiffeId, SpiffeIdError
    from certs.store import FileStore

    if not args.identity:
        raise UserError("--ca-dir needs at least one --identity spiffe://<td>/ns/<ns>/sa/<sa>")
    try:
        ids = [SpiffeId.parse(i) for i in args.identity]
    except SpiffeIdError as e:
        raise UserError(str(e)) from None
    manager = CertManager(LocalSigner(_load_ca(FileStore(args.ca_dir))))
    manager.set_identities(ids)
    manager.prefetch()
    return manager.status()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
