"""`accel ca init`, `accel ca rotate-root`, `accel ca issue-node`, `accel certs`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

from accel.errors import UserError

DEFAULT_CA_DIR = "/etc/meshaccel/ca"
DEFAULT_STATUS = "/run/meshaccel/certs.json"


def register(sub: Any) -> None:
    ca = sub.add_parser("ca", help="the mesh certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)

    init = ca_sub.add_parser("init", help="create a self-signed root CA")
    _store_args(init)
    init.add_argument("--trust-domain", default="cluster.local")
    init.add_argument("--key-type", choices=["ec-p256", "rsa-3072"], default="ec-p256")
    init.add_argument("--validity-days", type=int, default=3650)
    init.add_argument("--force", action="store_true", help="replace an existing CA (every issued cert stops verifying)")
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

    certs = sub.add_parser("certs", help="workload certificates on this node: identity, serial, expiry, next refresh")
    certs.add_argument("--status-file", default=DEFAULT_STATUS, help="written by the running agent's cert manager")
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
        from kubernetes import client, config

        try:
            if args.kubeconfig:
                config.load_kube_config(args.kubeconfig)
            else:
                try:
                    config.load_incluster_config()
                except config.ConfigException:
                    config.load_kube_config()
        except (config.ConfigException, OSError) as e:
            raise UserError(f"cannot load Kubernetes credentials: {e}; pass --kubeconfig") from None
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
