"""Certificates from a lab's CA for Envoys configured by hand (a waypoint in the tests, the sidecar pair of
`bench mtls`): the same roots the lab's agents trust, so those Envoys and the node Envoys are peers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from accel.errors import UserError
from accel.lab_agent import agent_dir
from certs.ca import CertificateAuthority
from certs.keys import cert_pem, generate_key, key_pem
from certs.spiffe import SpiffeId
from certs.store import FileStore


@dataclass(frozen=True, slots=True)
class Credential:
    cert: Path  # chain, leaf first
    key: Path
    ca: Path  # the roots a peer is checked against (the lab CA's)


def lab_ca(lab_id: str) -> CertificateAuthority:
    material = FileStore(agent_dir(lab_id) / "ca").load()
    if material is None:
        raise UserError(f"lab {lab_id} runs no CA; start its agents with certs (accel lab up --agent --certs)")
    return CertificateAuthority(material)


def credential(folder: Path, name: str, spiffe_id: str, lab_id: str, ca: CertificateAuthority | None = None,
               not_before_offset: float = 0.0, ttl: int = 3600) -> Credential:
    """A certificate for `spiffe_id` signed by `ca` (the lab's CA by default), written to `folder`.
    not_before_offset < 0 back-dates it (with a short ttl: an expired certificate)."""
    roots = lab_ca(lab_id)
    signer = ca or roots
    if not_before_offset:
        signer = CertificateAuthority(signer.material, signer.trust_domain, clock=lambda: time.time() + not_before_offset)
    key = generate_key()
    leaf = signer.issue(SpiffeId.parse(spiffe_id), key.public_key(), ttl)
    folder.mkdir(parents=True, exist_ok=True)
    cert, keyf, bundle = folder / f"{name}.pem", folder / f"{name}-key.pem", folder / "lab-roots.pem"
    cert.write_text(cert_pem(leaf) + "".join(signer.chain_pem()[:-1]))
    keyf.write_text(key_pem(key))
    bundle.write_text(roots.trust_bundle_pem())
    return Credential(cert, keyf, bundle)
