"""What the agent's cert manager needs from a CA: turn a CSR into a chain. Three implementations:
`LocalSigner` (in-process CA, standalone/lab/bench), `certs.client.CaClient` (our CSR API or
istiod's, over gRPC)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from certs.ca import CertificateAuthority
from certs.keys import split_pem
from certs.spiffe import SpiffeId


class SignError(Exception):
    """The CA did not sign; the message says why (refusal text from the CA or the transport error)."""


@dataclass(frozen=True, slots=True)
class SignResult:
    chain_pem: tuple[str, ...]  # leaf first, root last
    trust_bundle_pem: tuple[str, ...] = ()  # every root the CA trusts now; empty = the chain's root only


class Signer(Protocol):
    def sign(self, csr_pem: str, spiffe_id: SpiffeId, ttl_seconds: int) -> SignResult: ...


class LocalSigner:
    """Signs with a CA object in this process; `ca` may be swapped (root rotation)."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca

    def sign(self, csr_pem: str, spiffe_id: SpiffeId, ttl_seconds: int) -> SignResult:
        ca = self.ca
        try:
            chain = ca.sign_csr(csr_pem, ttl_seconds, expected=spiffe_id)
        except ValueError as e:
            raise SignError(str(e)) from None
        return SignResult(tuple(chain), tuple(split_pem(ca.trust_bundle_pem())))

