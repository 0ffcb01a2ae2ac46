"""The CA: chains verified by `cryptography` and by the openssl CLI, in self-signed and
plugged-intermediate (Istio cacerts made by openssl) modes; leaf profile; stores; SPIFFE parsing."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from certs.ca import CaError, CaMaterial, CertificateAuthority, TtlError
from certs.csr import make_csr
from certs.keys import generate_key, key_pem, load_certs_pem
from certs.spiffe import SpiffeId, SpiffeIdError
from certs.store import FileStore
from tests.conftest import require

pytestmark = pytest.mark.unit

WEB = SpiffeId.workload("default", "web")


def openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)


def make_istio_cacerts(d: Path) -> None:
    """Istio's plug-in CA layout, made the way Istio's docs make it: with the openssl CLI."""
    require(shutil.which("openssl") is not None, "openssl CLI not installed")
    (d / "int.cnf").write_text(
        "[v3]\nbasicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,digitalSignature,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        "subjectAltName=URI:spiffe://cluster.local/ns/istio-system/sa/citadel\n"
    )
    steps = [
        ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072", "-out", "root-key.pem"],
        ["req", "-x509", "-new", "-key", "root-key.pem", "-sha256", "-days", "3650", "-subj", "/O=Istio/CN=Root CA",
         "-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-out", "root-cert.pem"],
        ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ca-key.pem"],
        ["req", "-new", "-key", "ca-key.pem", "-subj", "/O=Istio/CN=Intermediate CA/L=node-1", "-out", "ca.csr"],
        ["x509", "-req", "-in", "ca.csr", "-CA", "root-cert.pem", "-CAkey", "root-key.pem", "-CAcreateserial",
         "-days", "730", "-sha256", "-extfile", "int.cnf", "-extensions", "v3", "-out", "ca-cert.pem"],
    ]
    for step in steps:
        r = openssl(*step, cwd=d)
        assert r.returncode == 0, r.stderr
    (d / "cert-chain.pem").write_text((d / "ca-cert.pem").read_text() + (d / "root-cert.pem").read_text())
    os.chmod(d / "ca-key.pem", 0o600)


def issue(ca: CertificateAuthority, sid: SpiffeId = WEB, ttl: int = 3600, key_type: str = "ec-p256") -> list[str]:
    key = generate_key(key_type)  # type: ignore[arg-type]
    return ca.sign_csr(make_csr(key, sid), ttl)


def verify_both_ways(chain: list[str], roots_pem: str, tmp: Path, sid: SpiffeId = WEB) -> None:
    certs = [c for pem in chain for c in load_certs_pem(pem)]
    roots = load_certs_pem(roots_pem)
    verified = PolicyBuilder().store(Store(roots)).build_client_verifier().verify(certs[0], certs[1:])
    assert verified.subjects == [x509.UniformResourceIdentifier(str(sid))]
    (tmp / "roots.pem").write_text(roots_pem)
    (tmp / "leaf.pem").write_text(chain[0])
    (tmp / "untrusted.pem").write_text("".join(chain[1:]) or chain[0])
    for purpose in ("sslclient", "sslserver"):
        r = openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", "roots.pem", "-untrusted", "untrusted.pem",
                    "leaf.pem", cwd=tmp)
        assert r.returncode == 0 and "leaf.pem: OK" in r.stdout, r.stdout + r.stderr


def check_leaf_profile(leaf_pem: str, sid: SpiffeId, asked_ttl: int, is_rsa: bool = False) -> x509.Certificate:
    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(str(sid))]
    assert len(leaf.subject) == 0
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert ku.value.key_encipherment is is_rsa
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    window = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert window <= dt.timedelta(seconds=asked_ttl)
    return leaf


@pytest.mark.parametrize("root_key", ["ec-p256", "rsa-3072"])
def test_self_signed_chain_verifies_with_cryptography_and_openssl(tmp_path: Path, root_key: str) -> None:
    require(shutil.which("openssl") is not None, "openssl CLI not installed")
    ca = CertificateAuthority.create_root(key_type=root_key)  # type: ignore[arg-type]
    root = ca.roots[0]
    assert root.not_valid_after_utc - root.not_valid_before_utc == dt.timedelta(days=3650)
    chain = issue(ca, ttl=7200)
    assert len(chain) == 2 and load_certs_pem(chain[-1])[0] == root
    check_leaf_profile(chain[0], WEB, 7200)
    verify_both_ways(chain, ca.trust_bundle_pem(), tmp_path)


def test_rsa_leaf_gets_key_encipherment(tmp_path: Path) -> None:
    ca = CertificateAuthority.create_root()
    chain = issue(ca, key_type="rsa-2048", ttl=600)
    leaf = check_leaf_profile(chain[0], WEB, 600, is_rsa=True)
    assert isinstance(leaf.public_key(), rsa.RSAPublicKey)
    verify_both_ways(chain, ca.trust_bundle_pem(), tmp_path)


def test_plugged_istio_intermediate_chains_to_istio_root(tmp_path: Path) -> None:
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    make_istio_cacerts(cacerts)
    material = FileStore(cacerts).load()
    assert material is not None
    ca = CertificateAuthority(material)
    assert not ca.self_signed
    chain = issue(ca, ttl=3600)
    assert len(chain) == 3  # leaf, Istio intermediate, Istio root
    istio_root = (cacerts / "root-cert.pem").read_text()
    assert load_certs_pem(chain[-1]) == load_certs_pem(istio_root)
    leaf = check_leaf_profile(chain[0], WEB, 3600)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.issuer == load_certs_pem((cacerts / "ca-cert.pem").read_text())[0].subject
    verify_both_ways(chain, istio_root, tmp_path)
    with pytest.raises(CaError, match="plugged-in intermediate"):
        ca.rotation_prepared()


def test_plugged_material_is_checked(tmp_path: Path) -> None:
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    make_istio_cacerts(cacerts)
    files = {n: (cacerts / n).read_text() for n in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")}
    wrong_key = dict(files, **{"ca-key.pem": key_pem(generate_key())})
    with pytest.raises(CaError, match="does not match"):
        CertificateAuthority(CaMaterial.from_files(wrong_key))
    foreign_root = CertificateAuthority.create_root().material.ca_cert
    with pytest.raises(CaError, match="not in root-cert.pem|broken"):
        CertificateAuthority(CaMaterial.from_files(dict(files, **{"root-cert.pem": foreign_root, "cert-chain.pem": ""})))
    with pytest.raises(CaError, match="lacks ca-key.pem"):
        CaMaterial.from_files({k: v for k, v in files.items() if k != "ca-key.pem"})


def test_ttl_limits_and_clamping_to_ca_expiry() -> None:
    now = 1_800_000_000.0
    ca = CertificateAuthority.create_root(validity=3 * 86400, max_ttl=7 * 86400, clock=lambda: now)
    with pytest.raises(TtlError, match="exceeds this CA's maximum"):
        issue(ca, ttl=8 * 86400)
    with pytest.raises(TtlError, match="negative"):
        issue(ca, ttl=-1)
    # Asked for 5 days, but the root lives 3: the leaf must not outlive it.
    leaf = x509.load_pem_x509_certificate(issue(ca, ttl=5 * 86400)[0].encode())
    assert leaf.not_valid_after_utc == ca.roots[0].not_valid_after_utc
    default = x509.load_pem_x509_certificate(issue(ca, ttl=0)[0].encode())
    assert default.not_valid_after_utc - default.not_valid_before_utc == dt.timedelta(days=1)


def test_root_rotation_phases_keep_both_roots_trusted(tmp_path: Path) -> None:
    old = CertificateAuthority.create_root()
    prepared = old.rotation_prepared()
    assert len(prepared.roots) == 2 and prepared.cert == old.cert  # still signs with the old root
    active = prepared.rotation_activated()
    assert active.cert != old.cert and set(active.roots) == set(prepared.roots)
    old_leaf, new_leaf = issue(prepared), issue(active)
    verify_both_ways(old_leaf, active.trust_bundle_pem(), tmp_path)
    verify_both_ways(new_leaf, active.trust_bundle_pem(), tmp_path)
    finished = active.rotation_finished()
    assert finished.roots == [active.cert]
    with pytest.raises(Exception, match="candidates exhausted|validation failed"):
        verify_both_ways(old_leaf, finished.trust_bundle_pem(), tmp_path)
    with pytest.raises(CaError, match="no prepared root"):
        finished.rotation_activated()


def test_file_store_keeps_key_owner_only_and_refuses_loose_modes(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "ca")
    assert store.load() is None
    ca = CertificateAuthority.create_root().rotation_prepared()
    store.save(ca.material)
    for name in ("ca-key.pem", "next-root-key.pem"):
        assert stat.S_IMODE((tmp_path / "ca" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert store.load() == ca.material
    store.save(ca.rotation_activated().material)
    assert not (tmp_path / "ca" / "next-root-key.pem").exists()
    os.chmod(tmp_path / "ca" / "ca-key.pem", 0o644)
    with pytest.raises(CaError, match="mode 0644"):
        store.load()


@pytest.mark.parametrize(
    "text, error",
    [
        ("https://cluster.local/ns/a/sa/b", "must start with spiffe://"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain"),
        ("spiffe://cluster.local:443/ns/a/sa/b", "port"),
        ("spiffe://cluster.local/ns/../sa/b", "dot segment"),
        ("spiffe://cluster.local/ns//sa/b", "empty"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
        ("spiffe://cluster.local", "needs a path"),
    ],
)
def test_spiffe_id_parse_refuses(text: str, error: str) -> None:
    with pytest.raises(SpiffeIdError, match=error):
        SpiffeId.parse(text)


def test_spiffe_id_round_trip() -> None:
    sid = SpiffeId.parse("spiffe://example.org/ns/prod/sa/api")
    assert (sid.trust_domain, sid.namespace, sid.service_account) == ("example.org", "prod", "api")
    assert str(sid) == "spiffe://example.org/ns/prod/sa/api"
    node = SpiffeId.node("node-1", "example.org")
    assert node.node_name == "node-1" and not node.is_workload
