"""Delegation to istiod: the agent's manager against an in-process gRPC server implementing
`istio.v1.auth.IstioCertificateService` the way istiod does (TLS, bearer token, ClusterID header,
ImpersonatedIdentity metadata), signing with a CA that stands in for istiod's."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from cryptography import x509

from certs import proto
from certs.api import server_credentials
from certs.ca import CertificateAuthority
from certs.istiod import IstiodSigner
from certs.manager import CertManager
from certs.signer import SignError
from certs.spiffe import SpiffeId

pytestmark = pytest.mark.unit

WEB = SpiffeId.workload("default", "web")
ISTIOD_NAME = "istiod.istio-system.svc"


@dataclass
class FakeIstiod:
    """Checks what istiod checks on this path; records every request it accepted."""

    ca: CertificateAuthority
    token: str = "ztunnel-token"
    seen: list[dict[str, Any]] = field(default_factory=list)

    def create_certificate(self, request: Any, context: grpc.ServicerContext) -> Any:
        md = dict(context.invocation_metadata())
        if md.get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "authenticate failed")
        if md.get("clusterid") != "Kubernetes":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing ClusterID")
        impersonated = proto.impersonated_identity(request)
        csr = x509.load_pem_x509_csr(request.csr.encode())
        self.seen.append({"impersonated": impersonated, "csr": csr, "ttl": request.validity_duration})
        chain = self.ca.sign_csr(request.csr, request.validity_duration, SpiffeId.parse(impersonated or ""))
        return proto.IstioCertificateResponse(cert_chain=chain)


@pytest.fixture
def istiod() -> Iterator[tuple[FakeIstiod, str]]:
    fake = FakeIstiod(CertificateAuthority.create_root(key_type="ec-p256"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                proto.SERVICE,
                {
                    proto.METHOD: grpc.unary_unary_rpc_method_handler(
                        fake.create_certificate,
                        request_deserializer=proto.IstioCertificateRequest.FromString,
                        response_serializer=proto.IstioCertificateResponse.SerializeToString,
                    )
                },
            )
        ]
    )
    port = server.add_secure_port("127.0.0.1:0", server_credentials(fake.ca, [ISTIOD_NAME]))
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


def test_manager_gets_svid_from_istiod(istiod: tuple[FakeIstiod, str]) -> None:
    fake, address = istiod
    signer = IstiodSigner(fake.ca.trust_bundle_pem(), lambda: fake.token, address=address, server_name=ISTIOD_NAME)
    m = CertManager(signer)
    m.set_identities([WEB])
    assert m.prefetch() == 1
    svid = m.get(WEB)
    assert svid is not None
    assert m.trust_bundle_pem() == fake.ca.trust_bundle_pem()  # istiod's root: last of the chain
    (req,) = fake.seen
    assert req["impersonated"] == str(WEB) and req["ttl"] == 86400
    csr: x509.CertificateSigningRequest = req["csr"]
    assert csr.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert len(csr.subject) == 0
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(str(WEB))] and len(list(csr.extensions)) == 1
    signer.close()


def test_istiod_refusal_is_reported_and_retried(istiod: tuple[FakeIstiod, str]) -> None:
    fake, address = istiod
    signer = IstiodSigner(fake.ca.trust_bundle_pem(), lambda: "wrong", address=address, server_name=ISTIOD_NAME)
    with pytest.raises(SignError, match="UNAUTHENTICATED: authenticate failed"):
        from certs.csr import make_csr
        from certs.keys import generate_key

        signer.sign(make_csr(generate_key(), WEB), WEB, 3600)
    m = CertManager(signer)
    m.set_identities([WEB])
    assert m.prefetch() == 0 and m.get(WEB) is None and m.status()[0].failures == 1
    assert not fake.seen
    signer.close()


def test_istiod_needs_p256_keys(istiod: tuple[FakeIstiod, str]) -> None:
    fake, address = istiod
    signer = IstiodSigner(fake.ca.trust_bundle_pem(), lambda: fake.token, address=address, server_name=ISTIOD_NAME)
    m = CertManager(signer, key_type="ec-p384")
    m.set_identities([WEB])
    assert m.prefetch() == 0
    assert "ECDSA P-256" in (m.status()[0].last_error or "") and not fake.seen
    signer.close()
