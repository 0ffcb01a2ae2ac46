"""The in-cluster pieces, driven by the real `kubernetes` client against an in-process HTTP server
speaking the Secret and TokenReview APIs: the CA kept in a Secret, and the TokenReview verifier
authenticating a node agent to the real CSR API."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from certs.api import CA_SERVER_NAME, CertificateService, serve, server_credentials
from certs.auth import NODE_NAME_EXTRA, TokenReviewVerifier
from certs.ca import CertificateAuthority
from certs.client import CaClient, server_trust
from certs.csr import make_csr
from certs.keys import generate_key
from certs.signer import SignError
from certs.spiffe import SpiffeId
from certs.store import SecretStore

pytestmark = pytest.mark.unit

SECRETS = "/api/v1/namespaces/meshaccel-system/secrets"
AGENT_SA = "system:serviceaccount:meshaccel-system:meshaccel-agent"


class FakeApi(BaseHTTPRequestHandler):
    secrets: dict[str, dict[str, Any]] = {}
    tokens: dict[str, dict[str, Any]] = {}
    version = 0

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))  # type: ignore[no-any-return]

    def _not_found(self) -> None:
        self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})

    def do_GET(self) -> None:
        name = self.path.removeprefix(SECRETS + "/")
        if name in self.secrets:
            self._send(200, self.secrets[name])
        else:
            self._not_found()

    def do_POST(self) -> None:
        body = self._body()
        if self.path == SECRETS:
            FakeApi.version += 1
            body["metadata"]["resourceVersion"] = str(FakeApi.version)
            self.secrets[body["metadata"]["name"]] = body
            self._send(201, body)
        elif self.path == "/apis/authentication.k8s.io/v1/tokenreviews":
            user = self.tokens.get(body["spec"]["token"])
            body["status"] = {"authenticated": True, "user": user} if user else {"authenticated": False, "error": "invalid bearer token"}
            self._send(201, body)
        else:
            self._not_found()

    def do_PUT(self) -> None:
        name = self.path.removeprefix(SECRETS + "/")
        body = self._body()
        if name not in self.secrets:
            return self._not_found()
        if body["metadata"].get("resourceVersion") != self.secrets[name]["metadata"]["resourceVersion"]:
            return self._send(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409})
        FakeApi.version += 1
        body["metadata"]["resourceVersion"] = str(FakeApi.version)
        self.secrets[name] = body
        self._send(200, body)


@pytest.fixture
def api() -> Iterator[client.ApiClient]:
    FakeApi.secrets, FakeApi.tokens = {}, {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{httpd.server_address[1]}"
    with client.ApiClient(cfg) as c:
        yield c
    httpd.shutdown()
    httpd.server_close()
    t.join()


def test_ca_lives_in_a_secret(api: client.ApiClient) -> None:
    store = SecretStore(client.CoreV1Api(api), "meshaccel-system", "cacerts")
    assert store.load() is None
    ca = CertificateAuthority.create_root()
    store.save(ca.material)
    secret = FakeApi.secrets["cacerts"]
    assert set(secret["data"]) == {"ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"}
    assert store.load() == ca.material
    rotated = ca.rotation_prepared()
    store.save(rotated.material)  # replace with the read resourceVersion
    assert store.load() == rotated.material
    assert CertificateAuthority(store.load()).roots == rotated.roots  # type: ignore[arg-type]


def test_token_review_authenticates_node_agent(api: client.ApiClient) -> None:
    web = SpiffeId.workload("default", "web")
    FakeApi.tokens = {
        "agent-token": {"username": AGENT_SA, "extra": {NODE_NAME_EXTRA: ["node-a"]}},
        "app-token": {"username": "system:serviceaccount:default:web", "extra": {NODE_NAME_EXTRA: ["node-a"]}},
        "unbound-token": {"username": AGENT_SA},
    }
    verifier = TokenReviewVerifier(client.AuthenticationV1Api(api), ["meshaccel-system/meshaccel-agent"], ["meshaccel-ca"])
    ca = CertificateAuthority.create_root()
    server, port = serve(CertificateService(ca, lambda n: {web} if n == "node-a" else set(), verifier),
                         "127.0.0.1:0", server_credentials(ca))
    try:
        def sign(token: str) -> int:
            c = CaClient(f"127.0.0.1:{port}", server_trust(ca.trust_bundle_pem()), server_name=CA_SERVER_NAME,
                         token=lambda: token)
            try:
                return len(c.sign(make_csr(generate_key(), web), web, 3600).chain_pem)
            finally:
                c.close()

        assert sign("agent-token") == 2
        for token, why in [
            ("forged", "rejected by TokenReview: invalid bearer token"),
            ("app-token", "not a node agent"),
            ("unbound-token", "not bound to a pod on a node"),
        ]:
            with pytest.raises(SignError, match=f"UNAUTHENTICATED: .*{why}"):
                sign(token)
    finally:
        server.stop(None)
