"""Key generation, key-strength policy and PEM helpers shared by the CA, the CSR API and the agent."""

from __future__ import annotations

from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PublicKeyTypes

KeyType = Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"]
KEY_TYPES: tuple[KeyType, ...] = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192  # bounds the CPU an attacker can make us spend verifying one CSR
ALLOWED_CURVES = ("secp256r1", "secp384r1", "secp521r1")


class WeakKeyError(ValueError):
    """A key the CA refuses to certify; the message names the key and the rule."""


def generate_key(key_type: KeyType = "ec-p256") -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def check_public_key(key: PublicKeyTypes) -> None:
    """RSA 2048..8192 bits, or EC on P-256/P-384/P-521; anything else is refused."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise WeakKeyError(f"RSA key of {key.key_size} bits is too weak; at least {MIN_RSA_BITS} bits required")
        if key.key_size > MAX_RSA_BITS:
            raise WeakKeyError(f"RSA key of {key.key_size} bits is larger than the {MAX_RSA_BITS}-bit limit")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise WeakKeyError(f"EC curve {key.curve.name} is not allowed; use P-256, P-384 or P-521")
        return
    raise WeakKeyError(f"{type(key).__name__.lstrip('_')} keys are not allowed; use ECDSA P-256 or RSA >= 2048")


def signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    """SHA-384 for P-384 and up, SHA-256 otherwise (what TLS peers expect for each key size)."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def key_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def load_key_pem(pem: str | bytes, what: str = "private key") -> PrivateKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{what} is a {type(key).__name__}; only EC and RSA keys are supported")
    return key


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_certs_pem(pem: str | bytes, what: str = "certificate file") -> list[x509.Certificate]:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ValueError(f"{what} holds no readable PEM certificate: {e}") from None
    return certs


def same_public_key(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(serialization.Encoding.DER, fmt)


def split_pem(bundle: str) -> list[str]:
    """One PEM string per certificate in a concatenated bundle."""
    marker = "-----END CERTIFICATE-----"
    return [part.strip() + "\n" + marker + "\n" for part in bundle.split(marker) if part.strip()]
