"""The agent's cert manager driven by an injectable clock: refresh before expiry at half-life with
jitter, backoff against a failing CA, expired certificates never served, trust bundle across a
root rotation, prefetch and forgetting identities, keys only in memory."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from cryptography import x509

from certs.ca import CertificateAuthority
from certs.manager import BACKOFF_CAP, CertManager, Svid, load_status
from certs.signer import LocalSigner, SignError, SignResult
from certs.spiffe import SpiffeId

pytestmark = pytest.mark.unit

DAY = 86400
A = SpiffeId.workload("default", "a")
B = SpiffeId.workload("default", "b")


class Clock:
    def __init__(self, t: float = 1_900_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FlakySigner:
    """A real LocalSigner behind a switch that makes the CA unreachable."""

    def __init__(self, inner: LocalSigner) -> None:
        self.inner = inner
        self.down = False
        self.calls = 0

    def sign(self, csr_pem: str, spiffe_id: SpiffeId, ttl_seconds: int) -> SignResult:
        self.calls += 1
        if self.down:
            raise SignError("CA unreachable: connection refused")
        return self.inner.sign(csr_pem, spiffe_id, ttl_seconds)


def setup(clock: Clock, **kw: object) -> tuple[CertManager, FlakySigner, list[tuple[SpiffeId, Svid | None]]]:
    signer = FlakySigner(LocalSigner(CertificateAuthority.create_root(clock=clock)))
    m = CertManager(signer, clock=clock, rng=random.Random(7), **kw)  # type: ignore[arg-type]
    events: list[tuple[SpiffeId, Svid | None]] = []
    m.subscribe(lambda sid, svid: events.append((sid, svid)))
    return m, signer, events


def test_prefetch_then_refresh_at_half_life_with_jitter() -> None:
    clock = Clock()
    start = clock.t
    m, signer, events = setup(clock)
    m.set_identities([A, B])
    assert m.prefetch() == 2 and signer.calls == 2
    first = m.get(A)
    assert first is not None and first.not_after - first.not_before == DAY
    due = m.next_due()
    assert due is not None and clock.t + 0.4 * DAY <= due <= clock.t + 0.6 * DAY
    # Nothing to do before it is due.
    clock.t = due - 1
    assert m.run_due() == 0 and m.get(A) == first
    clock.t = start + 0.61 * DAY  # past both jittered refresh points, long before expiry
    assert m.run_due() == 2
    second = m.get(A)
    assert second is not None and second.serial != first.serial and second.not_after > first.not_after
    assert second.key_pem != first.key_pem  # a fresh key per certificate
    assert clock.t < first.not_after  # replaced before the old one expired
    assert [sid for sid, _ in events].count(A) == 2 and all(svid is not None for _, svid in events)
    # Jitter: the two identities were not scheduled for the same instant.
    assert len({s.next_refresh for s in m.status()}) == 2


def test_failing_ca_backs_off_exponentially_up_to_a_cap_and_recovers() -> None:
    clock = Clock()
    m, signer, _ = setup(clock)
    m.set_identities([A])
    signer.down = True
    delays = []
    for _ in range(12):
        calls = signer.calls
        assert m.run_due() == 0 and signer.calls == calls + 1
        due = m.next_due()
        assert due is not None
        delays.append(due - clock.t)
        clock.t = due
    assert all(later > earlier for earlier, later in zip(delays[:6], delays[1:7], strict=True))
    assert max(delays) <= BACKOFF_CAP and delays[-1] > BACKOFF_CAP * 0.85
    status = m.status()[0]
    assert status.failures == 12 and "connection refused" in (status.last_error or "")
    assert m.get(A) is None
    signer.down = False
    assert m.run_due() == 1 and m.get(A) is not None and m.status()[0].failures == 0


def test_expired_certificate_is_never_served() -> None:
    clock = Clock()
    m, signer, events = setup(clock)
    m.set_identities([A])
    m.prefetch()
    svid = m.get(A)
    assert svid is not None
    signer.down = True  # the CA stays down through the whole lifetime
    while clock.t < svid.not_after + 600:
        clock.t = min(m.next_due() or clock.t + 60, svid.not_after + 600)
        m.run_due()
        served = m.get(A)
        assert served is None or served.not_after > clock.t
    assert m.get(A) is None
    assert events[-1] == (A, None)  # SDS is told to withdraw it
    # At the exact expiry instant it is not served either.
    m2, _, _ = setup(Clock(clock.t))
    m2.set_identities([B])
    m2.prefetch()
    s2 = m2.get(B)
    assert s2 is not None
    m2.clock.t = s2.not_after  # type: ignore[attr-defined]
    assert m2.get(B) is None


def test_trust_bundle_holds_old_and_new_root_during_rotation() -> None:
    clock = Clock()
    m, signer, _ = setup(clock, root_grace=2 * DAY)
    bundles: list[str] = []
    m.subscribe_bundle(bundles.append)
    m.set_identities([A])
    m.prefetch()
    old = signer.inner.ca
    assert m.trust_bundle_pem() == old.trust_bundle_pem()
    signer.inner.ca = old.rotation_prepared().rotation_activated()
    clock.t = m.next_due() or clock.t
    m.run_due()
    roots = x509.load_pem_x509_certificates(m.trust_bundle_pem().encode())
    assert set(roots) == {old.roots[0], signer.inner.ca.cert} and len(bundles) == 2
    # The CA drops the old root; the agent keeps it for the grace period, then lets go.
    signer.inner.ca = signer.inner.ca.rotation_finished()
    for _ in range(6):
        clock.t = m.next_due() or clock.t
        m.run_due()
    roots = x509.load_pem_x509_certificates(m.trust_bundle_pem().encode())
    assert roots == [signer.inner.ca.cert]
    assert len(bundles) == 3


def test_forgotten_identity_is_withdrawn_and_status_file_has_no_keys(tmp_path: Path) -> None:
    clock = Clock()
    status = tmp_path / "certs.json"
    m, _, events = setup(clock, status_path=status)
    m.set_identities([A, B])
    m.prefetch()
    text = status.read_text()
    assert "PRIVATE KEY" not in text and "CERTIFICATE" not in text
    rows = load_status(status)
    assert [r.spiffe_id for r in rows] == [str(A), str(B)] and all(r.serial for r in rows)
    m.set_identities([B])
    assert m.get(A) is None and m.identities() == [B]
    assert events[-1] == (A, None)


def test_manager_refuses_a_chain_for_the_wrong_identity() -> None:
    clock = Clock()
    ca = CertificateAuthority.create_root(clock=clock)

    class Liar:
        def sign(self, csr_pem: str, spiffe_id: SpiffeId, ttl_seconds: int) -> SignResult:
            from certs.csr import make_csr
            from certs.keys import generate_key

            return SignResult(tuple(ca.sign_csr(make_csr(generate_key(), B), ttl_seconds)))

    m = CertManager(Liar(), clock=clock)
    m.set_identities([A])
    assert m.run_due() == 0 and m.get(A) is None
    assert "not spiffe://cluster.local/ns/default/sa/a" in (m.status()[0].last_error or "")
