"""Secrets for SDS: the small interface the cert manager plugs into, and the Envoy Secrets built from it.

A `SecretSource` answers, for a secret name (for us a workload's SPIFFE ID or any name a listener
asks for), the PEM material or None when it has none yet; Envoy then keeps waiting for that name
(its listener stays warming) without disturbing anything else. Rotation = the source returns new
material, a new snapshot is built, and the changed Secret goes out over the same ADS stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from meshxds.resources import tls_certificate_secret, validation_context_secret

TRUST_SUFFIX = "/trust"


@dataclass(frozen=True, slots=True)
class SecretMaterial:
    cert_chain_pem: bytes  # leaf first, then intermediates
    private_key_pem: bytes
    trust_bundle_pem: bytes  # the roots peers are checked against


SecretSource = Callable[[str], SecretMaterial | None]


def trust_name(name: str) -> str:
    """The name of the validation-context Secret that goes with certificate Secret `name`."""
    return name + TRUST_SUFFIX


def build_secrets(names: Iterable[str], source: SecretSource) -> list[secret_pb2.Secret]:
    """For each name the source knows: its certificate Secret and its trust-bundle Secret."""
    out: list[secret_pb2.Secret] = []
    for name in sorted(set(names)):
        material = source(name)
        if material is None:
            continue
        out.append(tls_certificate_secret(name, material.cert_chain_pem, material.private_key_pem))
        out.append(validation_context_secret(trust_name(name), material.trust_bundle_pem))
    return out
