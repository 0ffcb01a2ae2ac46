"""Real TLS 1.3 mutual handshakes between two Python `ssl` endpoints on 127.0.0.1 with leaves the
cert manager obtained; the server reads the client's SPIFFE ID from the certificate SAN. Also the
same handshake across a root rotation: one side on the old root, the other on the new."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority
from certs.manager import CertManager, Svid
from certs.signer import LocalSigner
from certs.spiffe import SpiffeId

pytestmark = pytest.mark.unit

CLIENT_ID = SpiffeId.workload("shop", "frontend")
SERVER_ID = SpiffeId.workload("shop", "checkout")


def peer_spiffe_id(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert()
    assert cert is not None
    sans: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())  # type: ignore[assignment]
    uris = [v for k, v in sans if k == "URI"]
    assert len(uris) == 1
    return str(uris[0])


def context(side: int, svid: Svid, bundle_pem: str, tmp: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    if side == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # identity is the SPIFFE URI SAN, checked below, not a DNS name
    ctx.load_verify_locations(cadata=bundle_pem)
    # ssl can only load a key from a file; a test-only temp file (the agent hands keys to Envoy over SDS).
    name = "server" if side == ssl.PROTOCOL_TLS_SERVER else "client"
    (tmp / f"{name}.pem").write_text(svid.cert_chain_pem)
    (tmp / f"{name}.key").write_text(svid.key_pem)
    ctx.load_cert_chain(tmp / f"{name}.pem", tmp / f"{name}.key")
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[str, str, str, bytes]:
    """Returns (TLS version, client ID seen by server, server ID seen by client, echoed bytes)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["client_id"] = peer_spiffe_id(tls)
                tls.sendall(b"hello " + tls.recv(64))
        except Exception as e:  # surfaced to the test below
            seen["error"] = e
        finally:
            listener.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, client_ctx.wrap_socket(raw) as tls:
            version = tls.version() or ""
            server_id = peer_spiffe_id(tls)
            tls.sendall(b"frontend")
            reply = tls.recv(64)
    finally:
        t.join(timeout=10)
    if "error" in seen:
        raise seen["error"]  # type: ignore[misc]
    return version, str(seen["client_id"]), server_id, reply


def manager_for(signer: LocalSigner, sid: SpiffeId) -> CertManager:
    m = CertManager(signer)
    m.set_identities([sid])
    assert m.prefetch() == 1
    return m


def test_mutual_tls13_handshake_with_issued_leaves(tmp_path: Path) -> None:
    signer = LocalSigner(CertificateAuthority.create_root())
    client, server = manager_for(signer, CLIENT_ID), manager_for(signer, SERVER_ID)
    c_svid, s_svid = client.get(CLIENT_ID), server.get(SERVER_ID)
    assert c_svid is not None and s_svid is not None
    version, client_id, server_id, reply = handshake(
        context(ssl.PROTOCOL_TLS_SERVER, s_svid, server.trust_bundle_pem(), tmp_path),
        context(ssl.PROTOCOL_TLS_CLIENT, c_svid, client.trust_bundle_pem(), tmp_path),
    )
    assert version == "TLSv1.3"
    assert client_id == str(CLIENT_ID) and server_id == str(SERVER_ID)
    assert reply == b"hello frontend"


def test_handshake_across_root_rotation(tmp_path: Path) -> None:
    old_ca = CertificateAuthority.create_root()
    signer = LocalSigner(old_ca)
    stale = manager_for(signer, CLIENT_ID)  # fetched before the rotation began: old root only
    signer.ca = old_ca.rotation_prepared()  # new root joins the bundle, old root still signs
    client = manager_for(signer, CLIENT_ID)
    signer.ca = signer.ca.rotation_activated()  # new root signs
    server = manager_for(signer, SERVER_ID)
    c_svid, s_svid = client.get(CLIENT_ID), server.get(SERVER_ID)
    assert c_svid is not None and s_svid is not None
    assert c_svid.cert_chain_pem != s_svid.cert_chain_pem
    assert len(client.trust_bundle_pem().split("BEGIN CERT")) == 3  # both roots
    version, client_id, server_id, _ = handshake(
        context(ssl.PROTOCOL_TLS_SERVER, s_svid, server.trust_bundle_pem(), tmp_path),
        context(ssl.PROTOCOL_TLS_CLIENT, c_svid, client.trust_bundle_pem(), tmp_path),
    )
    assert (version, client_id, server_id) == ("TLSv1.3", str(CLIENT_ID), str(SERVER_ID))

    # Control: a peer whose bundle holds only the old root cannot verify the new root's leaf.
    s_old = stale.get(CLIENT_ID)
    assert s_old is not None
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed|unknown ca"):
        handshake(
            context(ssl.PROTOCOL_TLS_SERVER, s_svid, server.trust_bundle_pem(), tmp_path),
            context(ssl.PROTOCOL_TLS_CLIENT, s_old, stale.trust_bundle_pem(), tmp_path),
        )
