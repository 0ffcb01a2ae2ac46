"""The CSR API through a real gRPC server on loopback (TLS): issuance, and every refusal with its
status, its message, and nothing signed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY

from certs import proto
from certs.api import CA_SERVER_NAME, CertificateService, serve, server_credentials
from certs.auth import AuthError
from certs.ca import CertificateAuthority
from certs.client import CaClient, server_trust
from certs.csr import make_csr
from certs.keys import PrivateKey, generate_key, load_certs_pem
from certs.signer import SignError
from certs.spiffe import SpiffeId

pytestmark = pytest.mark.unit

WEB = SpiffeId.workload("default", "web")  # runs on node-a
DB = SpiffeId.workload("data", "db")  # runs on node-b
PODS = {"node-a": {WEB}, "node-b": {DB}}


class StaticTokens:
    """A TokenVerifier with a fixed token table (the TokenReview one is tested in test_certs_kube)."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens

    def verify(self, token: str) -> str:
        if token not in self.tokens:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "bearer token rejected: unknown token")
        return self.tokens[token]


@dataclass
class Env:
    ca: CertificateAuthority
    target: str

    def client(self, node: str | None = "node-a", ca: CertificateAuthority | None = None, **kw: object) -> CaClient:
        cred = None
        if node is not None:
            key = generate_key()
            cred = ("".join((ca or self.ca).issue_node_cert(node, key.public_key())), key)
        return CaClient(
            self.target, server_trust(self.ca.trust_bundle_pem()), server_name=CA_SERVER_NAME, node_credential=cred,
            **kw,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    ca = CertificateAuthority.create_root(max_ttl=2 * 86400)
    service = CertificateService(ca, lambda node: PODS.get(node, set()), StaticTokens({"tok-a": "node-a"}))
    server, port = serve(service, "127.0.0.1:0", server_credentials(ca))
    yield Env(ca, f"127.0.0.1:{port}")
    server.stop(None)


def issued() -> float:
    return REGISTRY.get_sample_value("meshaccel_certs_issued_total") or 0.0


def refused(client: CaClient, csr: str, sid: SpiffeId = WEB, ttl: int = 3600) -> str:
    before = issued()
    with pytest.raises(SignError) as e:
        client.sign(csr, sid, ttl)
    assert issued() == before, "a refused request must sign nothing"
    return str(e.value)


def csr_with(
    key: PrivateKey | None = None,
    names: list[x509.GeneralName] | None = None,
    subject: list[x509.NameAttribute] | None = None,
) -> str:
    key = key or generate_key()
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject or []))
    if names is not None:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_node_certificate_gets_its_pods_identity(env: Env) -> None:
    before = issued()
    key = generate_key()
    result = env.client("node-a").sign(make_csr(key, WEB), WEB, 3600)
    assert issued() == before + 1
    certs = [load_certs_pem(p)[0] for p in result.chain_pem]
    assert certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == [str(WEB)]
    assert certs[-1] == env.ca.roots[0]  # leaf first, root last
    assert load_certs_pem("".join(result.trust_bundle_pem)) == env.ca.roots


def test_bearer_token_gets_its_pods_identity(env: Env) -> None:
    client = env.client(None, token=lambda: "tok-a")
    result = client.sign(make_csr(generate_key(), WEB), WEB, 3600)
    assert len(result.chain_pem) == 2


def test_without_impersonation_the_csr_san_is_the_request(env: Env) -> None:
    result = env.client("node-a", impersonate=False).sign(make_csr(generate_key(), WEB), WEB, 600)
    assert len(result.chain_pem) == 2


def test_refuses_identity_of_pod_on_another_node(env: Env) -> None:
    msg = refused(env.client("node-a"), make_csr(generate_key(), DB), DB)
    assert "PERMISSION_DENIED" in msg and f"node node-a runs no pod with identity {DB}" in msg
    msg = refused(env.client("node-c"), make_csr(generate_key(), WEB))
    assert "PERMISSION_DENIED" in msg and "node node-c" in msg


def test_refuses_unknown_node_credentials(env: Env) -> None:
    foreign = CertificateAuthority.create_root()
    msg = refused(env.client("node-a", ca=foreign), make_csr(generate_key(), WEB))
    assert "UNAUTHENTICATED" in msg and "not one this CA issued" in msg
    msg = refused(env.client(None), make_csr(generate_key(), WEB))
    assert "UNAUTHENTICATED" in msg and "no credential" in msg
    msg = refused(env.client(None, token=lambda: "stolen"), make_csr(generate_key(), WEB))
    assert "UNAUTHENTICATED" in msg and "bearer token rejected" in msg
    # A workload certificate from this very CA is not a node credential.
    wkey = generate_key()
    wchain = "".join(env.ca.sign_csr(make_csr(wkey, WEB), 600))
    client = CaClient(env.target, server_trust(env.ca.trust_bundle_pem()), server_name=CA_SERVER_NAME,
                      node_credential=(wchain, wkey))
    msg = refused(client, make_csr(generate_key(), WEB))
    assert "UNAUTHENTICATED" in msg


def test_refuses_node_proof_made_for_another_request(env: Env) -> None:
    """A captured node credential + proof cannot be replayed with a different CSR."""
    key = generate_key()
    chain = "".join(env.ca.issue_node_cert("node-a", key.public_key()))
    from certs.auth import NODE_CERT_HEADER, NODE_PROOF_HEADER, request_digest, sign_proof

    seen_csr = make_csr(generate_key(), WEB)
    proof = sign_proof(key, request_digest(seen_csr, 3600, str(WEB)))
    channel = grpc.secure_channel(env.target, server_trust(env.ca.trust_bundle_pem()),
                                  options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)])
    call = channel.unary_unary(proto.FULL_METHOD, proto.IstioCertificateRequest.SerializeToString,
                               proto.IstioCertificateResponse.FromString)
    before = issued()
    with pytest.raises(grpc.RpcError) as e:
        call(proto.make_request(make_csr(generate_key(), WEB), 3600, str(WEB)),
             metadata=[(NODE_CERT_HEADER, chain.encode()), (NODE_PROOF_HEADER, proof)], timeout=10)
    channel.close()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "proof of possession" in (e.value.details() or "")
    assert issued() == before


def _bad_signature_csr() -> str:
    der = bytearray(x509.load_pem_x509_csr(make_csr(generate_key(), WEB).encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the ECDSA signature value
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


BAD_CSRS = {
    "two URI SANs": (
        lambda: csr_with(names=[x509.UniformResourceIdentifier(str(WEB)), x509.UniformResourceIdentifier(str(DB))]),
        "2 URI SANs; exactly one",
    ),
    "DNS SAN": (
        lambda: csr_with(names=[x509.UniformResourceIdentifier(str(WEB)), x509.DNSName("web.default.svc")]),
        "DNSName SANs; only one URI SAN",
    ),
    "CN differs": (
        lambda: csr_with(names=[x509.UniformResourceIdentifier(str(WEB))],
                         subject=[x509.NameAttribute(NameOID.COMMON_NAME, "admin")]),
        "subject CN 'admin' differs",
    ),
    "wrong trust domain": (
        lambda: csr_with(names=[x509.UniformResourceIdentifier("spiffe://evil.example/ns/default/sa/web")]),
        "trust domain 'evil.example'",
    ),
    "non-SPIFFE URI": (
        lambda: csr_with(names=[x509.UniformResourceIdentifier("https://web.default.svc/")]),
        "not a SPIFFE ID",
    ),
    "no SAN": (lambda: csr_with(), "no subjectAltName"),
    "weak RSA-1024 key": (
        lambda: csr_with(rsa.generate_private_key(public_exponent=65537, key_size=1024),
                         [x509.UniformResourceIdentifier(str(WEB))]),
        "RSA key of 1024 bits is too weak",
    ),
    "bad signature": (_bad_signature_csr, "signature does not verify"),
    "garbage bytes": (lambda: "\x00\x17garbage\xff" * 20, "not PEM"),
    "garbage inside PEM": (
        lambda: "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n",
        "cannot be parsed",
    ),
    "20 KB of PEM": (
        lambda: "-----BEGIN CERTIFICATE REQUEST-----\n" + ("QUFB" * 16 + "\n") * 300 + "-----END CERTIFICATE REQUEST-----\n",
        "bytes; the limit is 8192",
    ),
    "two PEM blocks": (lambda: make_csr(generate_key(), WEB) * 2, "exactly one block"),
}


@pytest.mark.parametrize("case", list(BAD_CSRS))
def test_refuses_bad_csr(env: Env, case: str) -> None:
    make, expected = BAD_CSRS[case]
    msg = refused(env.client("node-a", impersonate=False), make())
    assert "INVALID_ARGUMENT" in msg and expected in msg, msg


def test_refuses_one_megabyte_of_pem_at_the_transport(env: Env) -> None:
    pem = "-----BEGIN CERTIFICATE REQUEST-----\n" + ("A" * 64 + "\n") * 16384 + "-----END CERTIFICATE REQUEST-----\n"
    assert len(pem) > 1_000_000
    msg = refused(env.client("node-a"), pem)
    assert "RESOURCE_EXHAUSTED" in msg and re.search(r"larger than max", msg), msg


def test_refuses_validity_longer_than_ca_allows(env: Env) -> None:
    msg = refused(env.client("node-a"), make_csr(generate_key(), WEB), ttl=3 * 86400)
    assert "INVALID_ARGUMENT" in msg and "exceeds this CA's maximum of 172800s" in msg
    msg = refused(env.client("node-a"), make_csr(generate_key(), WEB), ttl=-5)
    assert "INVALID_ARGUMENT" in msg and "negative" in msg


def test_refuses_impersonated_identity_that_differs_from_csr(env: Env) -> None:
    client = env.client("node-a")  # impersonates WEB, CSR names another pod on the same node? use DB's CSR
    msg = refused(client, make_csr(generate_key(), DB), WEB)
    assert "INVALID_ARGUMENT" in msg and f"differs from the requested identity {WEB}" in msg
