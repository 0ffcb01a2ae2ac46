"""Delegation to istiod's CA: the agent's CSRs go to `IstioCertificateService/CreateCertificate`
the way ztunnel sends them — ECDSA P-256 key, CSR with the URI SAN only, a bearer
service-account token, the `ClusterID` header, and `ImpersonatedIdentity` metadata naming the
pod's identity (istiod checks that the pod runs on the caller's node)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from certs.client import CaClient, server_trust
from certs.signer import SignError, SignResult
from certs.spiffe import SpiffeId

ISTIOD_ADDRESS = "istiod.istio-system.svc:15012"
ISTIOD_SERVER_NAME = "istiod.istio-system.svc"
TOKEN_PATH = "/var/run/secrets/tokens/istio-token"  # projected token, audience istio-ca


class IstiodSigner:
    """A `Signer` backed by istiod; use it with `CertManager(key_type="ec-p256")` (the default)."""

    def __init__(
        self,
        root_cert_pem: str,
        token: Callable[[], str],
        address: str = ISTIOD_ADDRESS,
        server_name: str = ISTIOD_SERVER_NAME,
        cluster_id: str = "Kubernetes",
        timeout: float = 10.0,
    ) -> None:
        self.client = CaClient(
            address,
            server_trust(root_cert_pem),
            server_name=server_name,
            token=token,
            impersonate=True,
            extra_metadata=(("clusterid", cluster_id),),  # Istio reads the ClusterID header, case-insensitive
            timeout=timeout,
        )

    def sign(self, csr_pem: str, spiffe_id: SpiffeId, ttl_seconds: int) -> SignResult:
        key = x509.load_pem_x509_csr(csr_pem.encode()).public_key()
        if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"):
            raise SignError("istiod delegation needs ECDSA P-256 keys; set the cert manager's key_type to ec-p256")
        return self.client.sign(csr_pem, spiffe_id, ttl_seconds)

    def close(self) -> None:
        self.client.close()


def file_token(path: str = TOKEN_PATH) -> Callable[[], str]:
    """Re-read the projected token on every call: kubelet rotates it in place."""

    def read() -> str:
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise SignError(f"cannot read the service-account token {path}: {e.strerror}") from None

    return read
