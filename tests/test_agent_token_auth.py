"""In cluster the agent authenticates to the CSR API with a projected service-account token that
the kubelet rotates, and trusts the CA through the root the CA publishes. The token file is read on
every request, so a rotated token is used at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from accel.agent_certs import make_signer
from accel.errors import UserError
from certs.api import CA_SERVER_NAME, CertificateService, serve, server_credentials
from certs.auth import AuthError
from certs.ca import CertificateAuthority
from certs.csr import make_csr
from certs.keys import generate_key
from certs.signer import SignError
from certs.spiffe import SpiffeId

pytestmark = pytest.mark.unit
WEB = SpiffeId.workload("shop", "web")


class Tokens:
    """Stands in for TokenReview: which token proves which node."""

    def __init__(self) -> None:
        self.valid = {"token-1": "node-a"}

    def verify(self, token: str) -> str:
        node = self.valid.get(token)
        if node is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "rejected by TokenReview: invalid bearer token")
        return node


@pytest.fixture
def ca_api() -> Iterator[tuple[str, CertificateAuthority, Tokens]]:
    ca = CertificateAuthority.create_root()
    tokens = Tokens()
    service = CertificateService(ca, lambda node: {WEB} if node == "node-a" else set(), tokens)
    server, port = serve(service, "127.0.0.1:0", server_credentials(ca, (CA_SERVER_NAME,)))
    try:
        yield f"127.0.0.1:{port}", ca, tokens
    finally:
        server.stop(0)


def test_token_file_is_reread_on_every_request(ca_api: tuple[str, CertificateAuthority, Tokens],
                                               tmp_path: Path) -> None:
    address, ca, tokens = ca_api
    token, root = tmp_path / "token", tmp_path / "root-cert.pem"
    token.write_text("token-1\n")
    root.write_text(ca.trust_bundle_pem())
    signer = make_signer(address, None, None, token_file=token, root_file=root)
    try:
        assert signer.sign(make_csr(generate_key(), WEB), WEB, 3600).chain_pem
        token.write_text("token-2")  # the kubelet rotated it; the CA does not know this one yet
        with pytest.raises(SignError, match="UNAUTHENTICATED"):
            signer.sign(make_csr(generate_key(), WEB), WEB, 3600)
        tokens.valid["token-2"] = "node-a"
        assert signer.sign(make_csr(generate_key(), WEB), WEB, 3600).chain_pem
    finally:
        signer.close()  # type: ignore[attr-defined]


def test_token_needs_the_ca_root(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    with pytest.raises(UserError, match="--ca-root-file"):
        make_signer("127.0.0.1:1", None, None, token_file=token)
    with pytest.raises(UserError, match="not both"):
        make_signer("127.0.0.1:1", tmp_path, None, token_file=token, root_file=token)
