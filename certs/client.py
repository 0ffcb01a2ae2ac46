"""gRPC client of `IstioCertificateService/CreateCertificate`: our CA or istiod, same wire."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from certs import proto
from certs.auth import NODE_CERT_HEADER, NODE_PROOF_HEADER, request_digest, sign_proof
from certs.keys import PrivateKey, split_pem
from certs.signer import SignError, SignResult
from certs.spiffe import SpiffeId


class CaClient:
    """Sends one CSR per call; the caller's credential is the TLS client cert and/or a bearer token."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials,
        server_name: str | None = None,
        token: Callable[[], str] | None = None,
        node_credential: tuple[str, PrivateKey] | None = None,
        impersonate: bool = True,
        extra_metadata: Sequence[tuple[str, str]] = (),
        timeout: float = 10.0,
    ) -> None:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self.channel = grpc.secure_channel(target, credentials, options=options)
        self._call = self.channel.unary_unary(
            proto.FULL_METHOD,
            request_serializer=proto.IstioCertificateRequest.SerializeToString,
            response_deserializer=proto.IstioCertificateResponse.FromString,
        )
        self.token = token
        self.node_credential = node_credential  # (chain PEM, key): proves the node on each request
        self.impersonate = impersonate
        self.extra_metadata = tuple(extra_metadata)
        self.timeout = timeout

    def sign(self, csr_pem: str, spiffe_id: SpiffeId, ttl_seconds: int) -> SignResult:
        impersonate = str(spiffe_id) if self.impersonate else None
        request = proto.make_request(csr_pem, ttl_seconds, impersonate)
        metadata: list[tuple[str, str | bytes]] = list(self.extra_metadata)
        if self.node_credential is not None:
            node_chain, node_key = self.node_credential
            proof = sign_proof(node_key, request_digest(csr_pem, ttl_seconds, impersonate))
            metadata += [(NODE_CERT_HEADER, node_chain.encode()), (NODE_PROOF_HEADER, proof)]
        if self.token is not None:
            metadata.append(("authorization", f"Bearer {self.token()}"))
        try:
            response, call = self._call.with_call(request, metadata=metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            raise SignError(f"CA refused {spiffe_id}: {code.name if code else 'ERROR'}: {details}") from None
        bundle: tuple[str, ...] = ()
        for key, value in call.initial_metadata() or ():
            if key == proto.TRUST_BUNDLE_HEADER and isinstance(value, bytes):
                bundle = tuple(split_pem(value.decode()))
        chain = tuple(str(c) for c in response.cert_chain)
        if not chain:
            raise SignError(f"CA returned an empty chain for {spiffe_id}")
        return SignResult(chain, bundle)

    def close(self) -> None:
        self.channel.close()



def server_trust(trust_bundle_pem: str) -> grpc.ChannelCredentials:
    """TLS that authenticates the CA server against our (or Istio's) roots."""
    return grpc.ssl_channel_credentials(root_certificates=trust_bundle_pem.encode())
