"""Who is calling the CSR API (authentication) and what it may get (authorization).

A caller is a node agent, proven by one of:
- a node certificate this CA issued (URI SAN `spiffe://<td>/meshaccel/node/<node>`, clientAuth),
  sent as request metadata with a proof of possession: the node key's signature over this very
  request (CSR, validity, impersonated identity). Checking it here rather than in the TLS
  handshake lets an unknown or expired credential get a clear UNAUTHENTICATED status instead of
  a closed socket; and a replayed proof only ever gets a certificate for the replayer's victim's
  CSR key, which the replayer cannot use. A client certificate verified by the TLS layer (server
  started with `require_client_cert=True`) is accepted as well.
- a bearer token that a pluggable verifier maps to a node (in cluster: TokenReview).
A node may only obtain identities of pods scheduled on it, as told by `pods_on_node`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from certs.keys import PrivateKey, load_certs_pem
from certs.spiffe import SpiffeId, SpiffeIdError

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"  # set by the API server on pod-bound tokens
NODE_CERT_HEADER = "meshaccel-node-cert-bin"  # node certificate chain, PEM, leaf first
NODE_PROOF_HEADER = "meshaccel-node-proof-bin"  # node key's signature over request_digest(...)

PodsOnNode = Callable[[str], Collection[SpiffeId]]


class AuthError(Exception):
    """A refusal with the gRPC status to return and a one-line message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Caller:
    node: str
    method: str  # "node-certificate" or "token"


class TokenVerifier(Protocol):
    def verify(self, token: str) -> str:
        """Return the node name the token proves; raise AuthError(UNAUTHENTICATED, ...) otherwise."""
        ...


class TokenReviewVerifier:
    """Projected service-account token → node, via `kubernetes.client.AuthenticationV1Api`.

    Accepts only the listed service accounts (the agent's) and reads the node from the token's
    pod binding, so a stolen token names the node it was minted for and no other.
    """

    def __init__(self, auth_v1: Any, service_accounts: Sequence[str], audiences: Sequence[str] = ()) -> None:
        self.api = auth_v1
        self.allowed = {f"system:serviceaccount:{sa.replace('/', ':')}" for sa in service_accounts}
        self.audiences = list(audiences)

    def verify(self, token: str) -> str:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        spec = client.V1TokenReviewSpec(token=token, audiences=self.audiences or None)
        try:
            review = self.api.create_token_review(client.V1TokenReview(spec=spec))
        except ApiException as e:
            raise AuthError(grpc.StatusCode.UNAVAILABLE, f"TokenReview failed: HTTP {e.status} {e.reason}") from None
        status = review.status
        if status is None or not status.authenticated:
            why = (status.error if status is not None else None) or "not authenticated"
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"bearer token rejected by TokenReview: {why}")
        user = status.user
        if user.username not in self.allowed:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"token belongs to {user.username}, not a node agent ({', '.join(sorted(self.allowed))})",
            )
        nodes = (user.extra or {}).get(NODE_NAME_EXTRA) or []
        if len(nodes) != 1:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "token is not bound to a pod on a node (no node-name claim)")
        return str(nodes[0])


def request_digest(csr: str, validity_seconds: int, impersonate: str | None) -> bytes:
    """What a node signs to prove it holds its key: exactly the fields the CA acts on."""
    h = hashlib.sha256(b"meshaccel-csr-proof-v1\0")
    for part in (csr.encode(), str(validity_seconds).encode(), (impersonate or "").encode()):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.digest()


def sign_proof(key: PrivateKey, digest: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, ec.ECDSA(hashes.SHA256()))
    return key.sign(digest, padding.PKCS1v15(), hashes.SHA256())


def authenticate(
    auth_context: Mapping[str, Sequence[bytes]],
    metadata: Sequence[tuple[str, str | bytes]],
    trust_domain: str,
    token_verifier: TokenVerifier | None,
    roots: Sequence[x509.Certificate] = (),
    digest: bytes = b"",
    now: float | None = None,
) -> Caller:
    """TLS-verified client cert, then node certificate + proof in metadata, then bearer token."""
    pem = auth_context.get("x509_pem_cert")
    if pem:
        return Caller(_node_from_cert(x509.load_pem_x509_certificate(pem[0]), trust_domain), "node-certificate")
    headers = {k.lower(): v for k, v in metadata}
    chain_pem, proof = headers.get(NODE_CERT_HEADER), headers.get(NODE_PROOF_HEADER)
    if chain_pem is not None or proof is not None:
        if not isinstance(chain_pem, bytes) or not isinstance(proof, bytes):
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"node credential needs both {NODE_CERT_HEADER} and {NODE_PROOF_HEADER}")
        return Caller(_verify_node_cert(chain_pem, proof, digest, roots, trust_domain, now), "node-certificate")
    token = _bearer(metadata)
    if token is not None:
        if token_verifier is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "bearer tokens are not accepted here; present a node certificate")
        return Caller(token_verifier.verify(token), "token")
    raise AuthError(
        grpc.StatusCode.UNAUTHENTICATED, "no credential: present a node certificate or an 'authorization: Bearer' token"
    )


def authorize(caller: Caller, identity: SpiffeId, pods_on_node: PodsOnNode) -> None:
    allowed = pods_on_node(caller.node)
    if identity not in allowed:
        raise AuthError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"node {caller.node} runs no pod with identity {identity}; a node gets only its own pods' identities",
        )


def _verify_node_cert(
    chain_pem: bytes, proof: bytes, digest: bytes, roots: Sequence[x509.Certificate], trust_domain: str, now: float | None
) -> str:
    def refuse(msg: str) -> AuthError:
        return AuthError(grpc.StatusCode.UNAUTHENTICATED, msg)

    if len(chain_pem) > 16 * 1024:
        raise refuse("node certificate chain is larger than 16 KiB")
    try:
        certs = load_certs_pem(chain_pem, "node certificate")
    except ValueError as e:
        raise refuse(str(e)) from None
    leaf = certs[0]
    builder = PolicyBuilder().store(Store(list(roots)))
    if now is not None:
        builder = builder.time(dt.datetime.fromtimestamp(now, tz=dt.UTC))
    try:
        builder.build_client_verifier().verify(leaf, certs[1:])
    except (VerificationError, ValueError) as e:
        raise refuse(f"node certificate is not one this CA issued or is expired: {e}") from None
    node = _node_from_cert(leaf, trust_domain)
    key = leaf.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(proof, digest, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(proof, digest, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise refuse(f"node certificate key type {type(key).__name__} is not supported")
    except InvalidSignature:
        raise refuse(f"node {node}: proof of possession does not verify for this request") from None
    return node


def _node_from_cert(cert: x509.Certificate, trust_domain: str) -> str:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as e:
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"client certificate unusable: {e}") from None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            sid = SpiffeId.parse(uri)
        except SpiffeIdError:
            continue
        if sid.trust_domain == trust_domain and sid.node_name is not None:
            return sid.node_name
    names = ", ".join(sans.get_values_for_type(x509.UniformResourceIdentifier)) or "no URI SAN"
    raise AuthError(
        grpc.StatusCode.UNAUTHENTICATED,
        f"client certificate ({names}) is not a node credential spiffe://{trust_domain}/meshaccel/node/<node>",
    )


def _bearer(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "authorization header must be 'Bearer <token>'")
            return token.strip()
    return None
