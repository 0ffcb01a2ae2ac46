"""Certificate signing requests: build them (agent side) and validate them strictly (CA side).

The CA copies nothing from a CSR except its public key: the leaf's name comes from the validated
SPIFFE ID and every extension from the CA's own profile. Validation still refuses anything a
careless CA would sign blindly, so a malformed request fails loudly instead of being "fixed".
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from certs.keys import PrivateKey, WeakKeyError, check_public_key
from certs.spiffe import SpiffeId, SpiffeIdError

MAX_CSR_BYTES = 8 * 1024  # an EC or RSA-4096 CSR with one URI SAN fits in 2 KiB


class CsrError(ValueError):
    """The CSR is refused; the message is one line saying why."""


@dataclass(frozen=True, slots=True)
class ValidCsr:
    spiffe_id: SpiffeId
    csr: x509.CertificateSigningRequest


def make_csr(key: PrivateKey, spiffe_id: SpiffeId) -> str:
    """A CSR with an empty subject and exactly one URI SAN (the shape Istio agents send)."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), critical=True)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def validate_csr(pem: str | bytes, trust_domain: str, expected: SpiffeId | None = None) -> ValidCsr:
    """Check size, encoding, signature, key strength, subject and SAN; return the requested ID."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"CSR is {len(data)} bytes; the limit is {MAX_CSR_BYTES}")
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise CsrError("CSR is not PEM: no '-----BEGIN CERTIFICATE REQUEST-----' block")
    if data.count(b"-----BEGIN") != 1:
        raise CsrError("CSR PEM must hold exactly one block")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise CsrError(f"CSR cannot be parsed: {e}") from None

    try:
        if not csr.is_signature_valid:
            raise CsrError("CSR signature does not verify with its own public key")
        key = csr.public_key()
    except (ValueError, TypeError) as e:  # unsupported key or malformed signature algorithm
        raise CsrError(f"CSR key or signature is unusable: {e}") from None
    try:
        check_public_key(key)
    except WeakKeyError as e:
        raise CsrError(str(e)) from None

    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        raise CsrError(f"CSR extensions cannot be parsed: {e}") from None
    others = [ext.oid.dotted_string for ext in extensions if ext.oid != x509.SubjectAlternativeName.oid]
    if others:
        raise CsrError(f"CSR requests extensions {', '.join(others)}; only subjectAltName is allowed")
    sans = [ext.value for ext in extensions if isinstance(ext.value, x509.SubjectAlternativeName)]
    if not sans:
        raise CsrError("CSR has no subjectAltName; it must carry exactly one URI SAN, the SPIFFE ID")
    names = list(sans[0])
    non_uri = [n for n in names if not isinstance(n, x509.UniformResourceIdentifier)]
    if non_uri:
        kinds = sorted({type(n).__name__ for n in non_uri})
        raise CsrError(f"CSR carries {', '.join(kinds)} SANs; only one URI SAN (the SPIFFE ID) is allowed")
    if len(names) != 1:
        raise CsrError(f"CSR carries {len(names)} URI SANs; exactly one (the SPIFFE ID) is allowed")
    uri = names[0].value
    try:
        sid = SpiffeId.parse(uri)
    except SpiffeIdError as e:
        raise CsrError(f"CSR URI SAN: {e}") from None
    if sid.trust_domain != trust_domain:
        raise CsrError(f"CSR asks for trust domain {sid.trust_domain!r}; this CA signs only {trust_domain!r}")
    if not sid.is_workload:
        raise CsrError(f"CSR asks for {sid}; only workload IDs spiffe://{trust_domain}/ns/<ns>/sa/<sa> are signed")
    if expected is not None and sid != expected:
        raise CsrError(f"CSR URI SAN {sid} differs from the requested identity {expected}")

    for attr in csr.subject:
        if attr.oid != NameOID.COMMON_NAME:
            raise CsrError(f"CSR subject carries {attr.oid._name}; the subject must be empty or CN=<SPIFFE ID>")
        if attr.value != str(sid):
            raise CsrError(f"CSR subject CN {attr.value!r} differs from its URI SAN {sid}")
    return ValidCsr(sid, csr)
