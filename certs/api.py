"""The CSR API: `istio.v1.auth.IstioCertificateService/CreateCertificate`, served by our CA.

Each refusal returns one gRPC status and a one-line message and signs nothing:
UNAUTHENTICATED (no/unknown credential), PERMISSION_DENIED (identity of a pod not on the caller's
node), INVALID_ARGUMENT (CSR or validity rejected), RESOURCE_EXHAUSTED (message over the transport
limit, refused by gRPC before we parse anything).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import Any, NoReturn

import grpc
from prometheus_client import Counter

from certs import proto
from certs.auth import AuthError, PodsOnNode, TokenVerifier, authenticate, authorize, request_digest
from certs.ca import CertificateAuthority, TtlError
from certs.csr import CsrError, validate_csr
from certs.keys import generate_key, key_pem
from certs.spiffe import SpiffeId, SpiffeIdError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024  # a CSR request is ~1 KiB; anything near this is an attack or a bug
CA_SERVER_NAME = "meshaccel-ca.meshaccel-system.svc"

ISSUED = Counter("meshaccel_certs_issued_total", "Workload certificates signed by the CSR API")
REFUSED = Counter("meshaccel_certs_refused_total", "CSR API requests refused", ["code"])


class CertificateService:
    def __init__(
        self,
        ca: CertificateAuthority,
        pods_on_node: PodsOnNode,
        token_verifier: TokenVerifier | None = None,
    ) -> None:
        self._ca = ca
        self._lock = threading.Lock()
        self.pods_on_node = pods_on_node
        self.token_verifier = token_verifier

    @property
    def ca(self) -> CertificateAuthority:
        return self._ca

    def set_ca(self, ca: CertificateAuthority) -> None:
        """Swap the signing CA (root rotation) without restarting the server."""
        with self._lock:
            self._ca = ca

    def create_certificate(self, request: Any, context: grpc.ServicerContext) -> Any:
        ca = self._ca
        node = "?"
        try:
            digest = request_digest(request.csr, int(request.validity_duration), _impersonated_text(request))
            caller = authenticate(
                context.auth_context(),
                context.invocation_metadata(),
                ca.trust_domain,
                self.token_verifier,
                roots=ca.roots,
                digest=digest,
                now=ca.clock(),
            )
            node = caller.node
            expected = _impersonated(request)
            valid = validate_csr(request.csr, ca.trust_domain, expected)
            authorize(caller, valid.spiffe_id, self.pods_on_node)
            chain = ca.sign_csr(valid, ca.check_ttl(int(request.validity_duration)))
        except AuthError as e:
            self._refuse(context, e.code, str(e), node)
        except (CsrError, TtlError) as e:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), node)
        ISSUED.inc()
        log.info("issued node=%s identity=%s ttl=%s", node, valid.spiffe_id, request.validity_duration)
        context.send_initial_metadata(((proto.TRUST_BUNDLE_HEADER, ca.trust_bundle_pem().encode()),))
        return proto.IstioCertificateResponse(cert_chain=chain)

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str, node: str) -> NoReturn:
        REFUSED.labels(code=code.name).inc()
        log.info("refused node=%s code=%s reason=%r", node, code.name, message)
        context.abort(code, message)
        raise AssertionError("grpc context.abort returned")  # abort always raises

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            proto.SERVICE,
            {
                proto.METHOD: grpc.unary_unary_rpc_method_handler(
                    self.create_certificate,
                    request_deserializer=proto.IstioCertificateRequest.FromString,
                    response_serializer=proto.IstioCertificateResponse.SerializeToString,
                )
            },
        )


def _impersonated_text(request: Any) -> str | None:
    try:
        return proto.impersonated_identity(request)
    except ValueError:
        return None  # reported after authentication by _impersonated


def _impersonated(request: Any) -> SpiffeId | None:
    try:
        text = proto.impersonated_identity(request)
        return SpiffeId.parse(text) if text is not None else None
    except (ValueError, SpiffeIdError) as e:
        raise CsrError(f"metadata {proto.IMPERSONATED_IDENTITY}: {e}") from None


def server_credentials(
    ca: CertificateAuthority, dns_names: Sequence[str] = (CA_SERVER_NAME,), require_client_cert: bool = False
) -> grpc.ServerCredentials:
    """TLS for the CSR API with a fresh in-memory serving key. Node credentials travel in metadata
    (see certs.auth); `require_client_cert` additionally demands a TLS client cert chaining to our
    roots, refusing everyone else in the handshake (no gRPC status then, just a closed socket)."""
    key = generate_key("ec-p256")
    chain = ca.issue_server_cert(dns_names, key.public_key())
    return grpc.ssl_server_credentials(
        [(key_pem(key).encode(), "".join(chain).encode())],
        root_certificates=ca.trust_bundle_pem().encode() if require_client_cert else None,
        require_client_auth=require_client_cert,
    )


def serve(
    service: CertificateService,
    address: str,
    credentials: grpc.ServerCredentials,
    workers: int = 4,
) -> tuple[grpc.Server, int]:
    """Start the CSR API on `address` (e.g. 127.0.0.1:0); returns the server and the bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        handlers=[service.handler()],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
    )
    port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address} for the CSR API")
    server.start()
    return server, port
