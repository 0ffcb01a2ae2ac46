"""The certificate authority: a self-signed root or a plugged-in intermediate, and leaf signing.

Both modes use Istio's `cacerts` layout (see `CaMaterial`): in self-signed mode the signing cert
is the root itself; in plugged mode it is an intermediate whose chain ends at Istio's root, so our
leaves chain to Istio's root. `root-cert.pem` may hold several roots: during a root rotation it
holds the new and the old one, and every peer that trusts the bundle accepts leaves of either.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.csr import CsrError, ValidCsr, validate_csr
from certs.keys import (
    KeyType,
    PrivateKey,
    cert_pem,
    check_public_key,
    generate_key,
    key_pem,
    load_certs_pem,
    load_key_pem,
    same_public_key,
    signature_hash,
)
from certs.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, check_trust_domain

DAY = 86400
DEFAULT_ROOT_VALIDITY = 3650 * DAY
DEFAULT_LEAF_TTL = DAY
DEFAULT_MAX_LEAF_TTL = 7 * DAY
CACERTS_FILES = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")
NEXT_ROOT_FILES = ("next-root-cert.pem", "next-root-key.pem")  # ours: a prepared, not yet active root


class CaError(ValueError):
    """CA material is unusable (bad files, key mismatch, broken chain); one line saying which."""


class TtlError(ValueError):
    """Requested validity is outside what this CA signs."""


@dataclass(frozen=True, slots=True)
class CaMaterial:
    """Istio's `cacerts` layout, as PEM text: the unit that stores and Secrets hold."""

    ca_cert: str
    ca_key: str
    root_cert: str
    cert_chain: str
    next_root_cert: str = ""
    next_root_key: str = ""

    def as_files(self) -> dict[str, str]:
        files = dict(zip(CACERTS_FILES, (self.ca_cert, self.ca_key, self.root_cert, self.cert_chain), strict=True))
        if self.next_root_cert:
            files.update(zip(NEXT_ROOT_FILES, (self.next_root_cert, self.next_root_key), strict=True))
        return files

    @classmethod
    def from_files(cls, files: dict[str, str]) -> CaMaterial:
        missing = [n for n in CACERTS_FILES[:3] if not files.get(n)]
        if missing:
            raise CaError(f"CA material lacks {', '.join(missing)} (Istio cacerts layout: {', '.join(CACERTS_FILES)})")
        return cls(
            files["ca-cert.pem"],
            files["ca-key.pem"],
            files["root-cert.pem"],
            files.get("cert-chain.pem", ""),
            files.get(NEXT_ROOT_FILES[0], ""),
            files.get(NEXT_ROOT_FILES[1], ""),
        )


class CertificateAuthority:
    def __init__(
        self,
        material: CaMaterial,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        max_ttl: int = DEFAULT_MAX_LEAF_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.trust_domain = check_trust_domain(trust_domain)
        self.max_ttl = max_ttl
        self.clock = clock
        self.material = material
        self.cert = _one_cert(material.ca_cert, "ca-cert.pem")
        self.key: PrivateKey = _load_key(material.ca_key)
        self.roots = load_certs_pem(material.root_cert, "root-cert.pem")
        chain = load_certs_pem(material.cert_chain, "cert-chain.pem") if material.cert_chain.strip() else []
        self.chain = _check_chain(self.cert, self.key, chain, self.roots)
        self._chain_pem = tuple(cert_pem(c) for c in self.chain)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def create_root(
        cls,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        key_type: KeyType = "ec-p256",
        validity: int = DEFAULT_ROOT_VALIDITY,
        max_ttl: int = DEFAULT_MAX_LEAF_TTL,
        clock: Callable[[], float] = time.time,
    ) -> CertificateAuthority:
        """A fresh self-signed root."""
        if key_type not in ("ec-p256", "ec-p384", "rsa-3072", "rsa-4096"):
            raise CaError(f"root key type {key_type!r} is not allowed; use ec-p256 or rsa-3072")
        key = generate_key(key_type)
        now = _utc(clock())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshaccel"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"meshaccel root CA {trust_domain} {now:%Y%m%dT%H%M%SZ}"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(seconds=validity))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, signature_hash(key))
        )
        root = cert_pem(cert)
        material = CaMaterial(ca_cert=root, ca_key=key_pem(key), root_cert=root, cert_chain=root)
        return cls(material, trust_domain, max_ttl, clock)

    @property
    def self_signed(self) -> bool:
        return len(self.chain) == 1

    # Root rotation without a gap: (1) prepare: a new root joins the trust bundle while the old
    # one still signs, and agents pick the bundle up at their next refresh; (2) activate: the new
    # root signs, both stay trusted; (3) finish, once every old leaf has expired: drop the old root.
    def rotation_prepared(self, key_type: KeyType = "ec-p256", validity: int = DEFAULT_ROOT_VALIDITY) -> CertificateAuthority:
        self._require_self_signed()
        if self.material.next_root_cert:
            raise CaError("a root rotation is already prepared; activate it first")
        new = CertificateAuthority.create_root(self.trust_domain, key_type, validity, self.max_ttl, self.clock)
        m = self.material
        bundle = m.root_cert + new.material.ca_cert
        return self._with(CaMaterial(m.ca_cert, m.ca_key, bundle, m.cert_chain, new.material.ca_cert, new.material.ca_key))

    def rotation_activated(self) -> CertificateAuthority:
        self._require_self_signed()
        m = self.material
        if not m.next_root_cert:
            raise CaError("no prepared root to activate; run the prepare step first")
        new_root = _one_cert(m.next_root_cert, "next-root-cert.pem")
        others = "".join(cert_pem(r) for r in self.roots if r != new_root)
        return self._with(CaMaterial(m.next_root_cert, m.next_root_key, m.next_root_cert + others, m.next_root_cert))

    def rotation_finished(self) -> CertificateAuthority:
        """Trust only the signing root (every leaf of the old one must have expired by now)."""
        self._require_self_signed()
        m = self.material
        if m.next_root_cert:
            raise CaError("a prepared root is not active yet; activate it before dropping the old root")
        return self._with(CaMaterial(m.ca_cert, m.ca_key, cert_pem(self.chain[-1]), m.cert_chain))

    def _require_self_signed(self) -> None:
        if not self.self_signed:
            raise CaError("this CA is a plugged-in intermediate; rotate the root where it lives (Istio's cacerts)")

    def _with(self, material: CaMaterial) -> CertificateAuthority:
        return CertificateAuthority(material, self.trust_domain, self.max_ttl, self.clock)

    # ---- what peers need -----------------------------------------------------------------------
    def trust_bundle_pem(self) -> str:
        return "".join(cert_pem(r) for r in self.roots)

    def chain_pem(self) -> tuple[str, ...]:
        """Signing cert up to its root, the tail of every chain we hand out."""
        return self._chain_pem

    # ---- signing -------------------------------------------------------------------------------
    def check_ttl(self, ttl: int) -> int:
        if ttl < 0:
            raise TtlError(f"validity {ttl}s is negative")
        if ttl == 0:
            return min(DEFAULT_LEAF_TTL, self.max_ttl)
        if ttl > self.max_ttl:
            raise TtlError(f"validity {ttl}s exceeds this CA's maximum of {self.max_ttl}s")
        return ttl

    def sign_csr(self, csr: str | bytes | ValidCsr, ttl: int, expected: SpiffeId | None = None) -> list[str]:
        """Validate a workload CSR and sign it; returns the chain as PEM, leaf first, root last."""
        valid = csr if isinstance(csr, ValidCsr) else validate_csr(csr, self.trust_domain, expected)
        if expected is not None and valid.spiffe_id != expected:
            raise CsrError(f"CSR URI SAN {valid.spiffe_id} differs from the requested identity {expected}")
        leaf = self.issue(valid.spiffe_id, valid.csr.public_key(), self.check_ttl(ttl))
        return [cert_pem(leaf), *self._chain_pem]

    def issue(
        self,
        spiffe_id: SpiffeId,
        public_key: CertificatePublicKeyTypes,
        ttl: int,
        usages: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        dns_names: Sequence[str] = (),
    ) -> x509.Certificate:
        """One leaf: empty subject, critical URI SAN, end-entity key usage; never longer than `ttl`."""
        check_public_key(public_key)
        now = int(self.clock())
        not_before = _utc(now)
        # Never outlive the signing chain: a leaf past its issuer's expiry would not verify anyway.
        not_after = min(_utc(now + ttl), *(c.not_valid_after_utc for c in self.chain))
        if not_after <= not_before:
            raise CaError("the CA certificate has expired; rotate or re-plug the CA")
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        names += [x509.DNSName(d) for d in dns_names]
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=is_rsa,  # RSA key exchange needs it; ECDSA keys never encipher
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            # RFC 5280: with an empty subject the SAN must be critical.
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_aki(self.cert), critical=False)
            .sign(self.key, signature_hash(self.key))
        )

    def issue_node_cert(self, node_name: str, public_key: CertificatePublicKeyTypes, ttl: int = 30 * DAY) -> list[str]:
        """The node agent's client credential for the CSR API (clientAuth only)."""
        cert = self.issue(SpiffeId.node(node_name, self.trust_domain), public_key, ttl, (ExtendedKeyUsageOID.CLIENT_AUTH,))
        return [cert_pem(cert), *self._chain_pem]

    def issue_server_cert(self, dns_names: Sequence[str], public_key: CertificatePublicKeyTypes, ttl: int = 30 * DAY) -> list[str]:
        """The CSR API's serving cert: the CA's own identity plus the DNS names clients dial."""
        sid = SpiffeId.workload("meshaccel-system", "meshaccel-ca", self.trust_domain)
        cert = self.issue(sid, public_key, ttl, (ExtendedKeyUsageOID.SERVER_AUTH,), dns_names)
        return [cert_pem(cert), *self._chain_pem]


def _one_cert(pem: str, what: str) -> x509.Certificate:
    try:
        certs = load_certs_pem(pem, what)
    except ValueError as e:
        raise CaError(str(e)) from None
    if len(certs) != 1:
        raise CaError(f"{what} must hold exactly one certificate, found {len(certs)}")
    return certs[0]


def _load_key(pem: str) -> PrivateKey:
    try:
        return load_key_pem(pem, "ca-key.pem")
    except ValueError as e:
        raise CaError(str(e)) from None


def _check_chain(
    cert: x509.Certificate, key: PrivateKey, chain: list[x509.Certificate], roots: list[x509.Certificate]
) -> list[x509.Certificate]:
    """Return signing cert .. root after checking each link, the key, and that the root is trusted."""
    if not roots:
        raise CaError("root-cert.pem holds no certificate")
    if not same_public_key(cert.public_key(), key.public_key()):
        raise CaError("ca-key.pem does not match the public key in ca-cert.pem")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CaError("ca-cert.pem has no basicConstraints; it is not a CA certificate") from None
    if not bc.ca:
        raise CaError("ca-cert.pem has basicConstraints CA:FALSE; it cannot sign certificates")
    if not chain:
        chain = [cert]
        if cert.issuer != cert.subject:
            chain += [r for r in roots if r.subject == cert.issuer][:1]
    if chain[0] != cert:
        raise CaError("cert-chain.pem must start with ca-cert.pem")
    for child, parent in zip(chain, chain[1:], strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except Exception as e:  # InvalidSignature, unsupported algorithm, ...
            raise CaError(f"cert-chain.pem is broken: {child.subject.rfc4514_string()} not signed by "
                          f"{parent.subject.rfc4514_string()} ({e or type(e).__name__})") from None
    top = chain[-1]
    if top not in roots:
        raise CaError(f"the chain ends at {top.subject.rfc4514_string()}, which is not in root-cert.pem")
    return chain


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        pub = issuer.public_key()
        assert isinstance(pub, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(pub)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(ts), tz=dt.UTC)
