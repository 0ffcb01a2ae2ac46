"""The agent's certificates: the identities of the pods on this node, kept in a CertManager.

The model's workload changes say which identities this node runs; the manager fetches (and keeps
fresh) one SVID per identity from the CA (`accel ca serve` over gRPC, or an in-process CA folder in
standalone/lab mode). SDS reads the SVIDs through `secret_source`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accel.errors import UserError
from accel.reconcile import on_node
from accel.state.model import ChangeSet, ObjectKey, Workload
from certs.manager import CertManager
from certs.signer import Signer
from certs.spiffe import SpiffeId, SpiffeIdError
from meshxds.sds import SecretMaterial

log = logging.getLogger(__name__)


def wants_certificate(w: Workload, node: str) -> bool:
    """Pods on this node that our mesh serves; Istio-managed pods get theirs from Istio."""
    return on_node(w, node) and not w.istio_managed


class CertsReconciler:
    """Follows the model's workloads and hands the set of local identities to the manager."""

    def __init__(self, node: str, manager: CertManager, on_problem: Callable[[str, str], None]) -> None:
        self.node = node
        self.manager = manager
        self.on_problem = on_problem
        self._pods: dict[ObjectKey, SpiffeId] = {}
        self._synced = False

    def on_change(self, cs: ChangeSet) -> None:
        changed = False
        for wc in cs.workloads:
            old = self._pods.pop(wc.key, None)
            new = None
            if wc.new is not None and wants_certificate(wc.new, self.node):
                try:
                    new = SpiffeId.parse(wc.new.identity.spiffe_id)
                except SpiffeIdError as e:
                    self.on_problem("identity_invalid", f"object={wc.key} {e}; no certificate for it")
                if new is not None:
                    self._pods[wc.key] = new
            changed |= old != new
        if cs.synced:
            self._synced = True
        # Before the first full sync the set is partial: wait, so nothing is fetched then forgotten.
        if self._synced and (changed or cs.synced):
            self.manager.set_identities(set(self._pods.values()))

    def identities(self) -> list[SpiffeId]:
        return self.manager.identities()

    def secret_source(self, name: str) -> SecretMaterial | None:
        """SDS: the SVID for the secret named by a SPIFFE ID, with the current trust bundle."""
        try:
            sid = SpiffeId.parse(name)
        except SpiffeIdError:
            return None
        svid = self.manager.get(sid)
        if svid is None:
            return None
        return SecretMaterial(svid.cert_chain_pem.encode(), svid.key_pem.encode(),
                              self.manager.trust_bundle_pem().encode())

    def status(self) -> dict[str, Any]:
        rows = self.manager.status()
        return {
            "identities": len(rows),
            "with_certificate": sum(1 for r in rows if r.serial is not None),
            "failing": sum(1 for r in rows if r.failures),
            "certificates": [{"spiffe_id": r.spiffe_id, "serial": r.serial, "not_after": r.not_after,
                              "next_refresh": r.next_refresh, "failures": r.failures, "last_error": r.last_error}
                             for r in rows],
        }


def make_signer(ca_address: str | None, node_credential: Path | None, ca_dir: Path | None,
                token_file: Path | None = None, root_file: Path | None = None) -> Signer:
    """--ca-address with --node-credential (lab/standalone) or with --ca-token-file and --ca-root-file
    (in cluster: a projected service-account token, the CA's root from a ConfigMap), or --ca-dir
    (an in-process CA)."""
    if ca_dir is not None:
        if ca_address is not None:
            raise UserError("give --ca-dir (in-process CA) or --ca-address (CSR API), not both")
        from certs.ca import CaError, CertificateAuthority
        from certs.signer import LocalSigner
        from certs.store import FileStore

        store = FileStore(ca_dir)
        try:
            material = store.load()
        except (CaError, OSError) as e:
            raise UserError(f"--ca-dir {ca_dir}: {e}") from None
        if material is None:
            raise UserError(f"--ca-dir {ca_dir}: no CA there; run `accel ca init --dir {ca_dir}` first")
        return LocalSigner(CertificateAuthority(material))
    if ca_address is None:
        raise UserError("the cert manager needs --ca-address HOST:PORT (with --node-credential) or --ca-dir")
    from certs.api import CA_SERVER_NAME
    from certs.client import CaClient, server_trust
    from certs.keys import load_key_pem

    if token_file is not None:
        if node_credential is not None:
            raise UserError("give --node-credential or --ca-token-file, not both")
        if root_file is None:
            raise UserError("--ca-token-file needs --ca-root-file (the CA's root-cert.pem)")
        try:
            roots = root_file.read_text()
            token_file.read_text()
        except OSError as e:
            raise UserError(f"cannot read {e.filename} ({e.strerror})") from None
        # Re-read on every request: the kubelet rotates projected tokens.
        return CaClient(ca_address, server_trust(roots), server_name=CA_SERVER_NAME,
                        token=lambda: token_file.read_text().strip())
    if node_credential is None:
        raise UserError("--ca-address needs --node-credential DIR (from `accel ca issue-node`) or --ca-token-file")

    try:
        chain = (node_credential / "node-cert.pem").read_text()
        key = load_key_pem((node_credential / "node-key.pem").read_text())
        roots = (node_credential / "root-cert.pem").read_text()
    except OSError as e:
        raise UserError(f"--node-credential {node_credential}: cannot read {e.filename} ({e.strerror}); "
                        "create it with `accel ca issue-node NODE --out DIR`") from None
    except ValueError as e:
        raise UserError(f"--node-credential {node_credential}: node-key.pem is not a private key: {e}") from None
    return CaClient(ca_address, server_trust(roots), server_name=CA_SERVER_NAME, node_credential=(chain, key))
