"""The agent's certificate manager: one SVID per identity on this node, kept fresh.

- Private keys live only in this process's memory (generated here, never written anywhere).
- Leaves are 24 h by default and refreshed at half-life with jitter, so a fleet of agents does
  not hit the CA at the same instant; failures back off exponentially up to a cap of minutes.
- `get()` never returns an expired certificate: past `not_after` it returns None and subscribers
  are told the identity has no certificate, so SDS withdraws it instead of serving a dead one.
- The trust bundle is the union of roots the CA announced recently: during a root rotation it
  holds the old and the new root, and an old root leaves it only after `root_grace` without being
  announced (by then every leaf it signed has expired), or when it expires itself.
- Time comes from an injectable clock; `run_due()` does all due work for that instant, so tests
  and the background thread drive the same code.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from certs.ca import DAY
from certs.csr import make_csr
from certs.keys import KeyType, PrivateKey, cert_pem, generate_key, key_pem, load_certs_pem, same_public_key
from certs.signer import Signer, SignError, SignResult
from certs.spiffe import SpiffeId

log = logging.getLogger(__name__)

DEFAULT_TTL = DAY
BACKOFF_BASE = 1.0
BACKOFF_CAP = 240.0  # seconds; "a few minutes" so a recovered CA is noticed quickly


@dataclass(frozen=True, slots=True)
class Svid:
    """An X.509 SVID as SDS hands it to Envoy: chain (leaf first) and key, both PEM."""

    spiffe_id: SpiffeId
    cert_chain_pem: str
    key_pem: str
    not_before: float
    not_after: float
    serial: int


@dataclass(frozen=True, slots=True)
class CertStatus:
    """What `accel certs` shows for one identity; never holds key material."""

    spiffe_id: str
    serial: str | None
    not_after: float | None
    next_refresh: float
    failures: int
    last_error: str | None


@dataclass(slots=True)
class _Entry:
    svid: Svid | None = None
    due: float = 0.0
    failures: int = 0
    last_error: str | None = None
    withdrawn: bool = False  # subscribers were told this identity has no valid cert


@dataclass(slots=True)
class _Root:
    cert: x509.Certificate
    pem: str
    last_announced: float


class CertManager:
    def __init__(
        self,
        signer: Signer,
        ttl: int = DEFAULT_TTL,
        key_type: KeyType = "ec-p256",
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        jitter: float = 0.1,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        root_grace: float = 2 * DAY,
        status_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.signer = signer
        self.ttl = ttl
        self.key_type: KeyType = key_type
        self.clock = clock
        self.rng = rng or random.Random()
        self.jitter = jitter
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.root_grace = root_grace
        self.status_path = Path(status_path) if status_path is not None else None
        self._entries: dict[SpiffeId, _Entry] = {}
        self._roots: dict[bytes, _Root] = {}
        self._lock = threading.RLock()
        self._subs: list[Callable[[SpiffeId, Svid | None], None]] = []
        self._bundle_subs: list[Callable[[str], None]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- what the agent and SDS call --------------------------------------------------------
    def set_identities(self, identities: Iterable[SpiffeId]) -> None:
        """The identities of pods on this node; new ones are fetched at once, gone ones forgotten."""
        wanted = set(identities)
        gone: list[SpiffeId] = []
        with self._lock:
            for sid in list(self._entries):
                if sid not in wanted:
                    del self._entries[sid]  # drops the only reference to its key
                    gone.append(sid)
            now = self.clock()
            for sid in wanted:
                self._entries.setdefault(sid, _Entry(due=now))
        for sid in gone:
            self._notify(sid, None)
        self._wake.set()

    def get(self, spiffe_id: SpiffeId) -> Svid | None:
        """The current SVID, or None if there is none or it has expired."""
        with self._lock:
            entry = self._entries.get(spiffe_id)
            svid = entry.svid if entry is not None else None
        if svid is None or svid.not_after <= self.clock():
            return None
        return svid

    def identities(self) -> list[SpiffeId]:
        with self._lock:
            return sorted(self._entries)

    def trust_bundle_pem(self) -> str:
        with self._lock:
            return "".join(r.pem for r in self._roots.values())

    def subscribe(self, callback: Callable[[SpiffeId, Svid | None], None]) -> None:
        """Called after every new SVID, and with None when an identity loses its certificate."""
        self._subs.append(callback)

    def subscribe_bundle(self, callback: Callable[[str], None]) -> None:
        """Called with the new bundle PEM whenever a root is added or dropped."""
        self._bundle_subs.append(callback)

    def status(self) -> list[CertStatus]:
        with self._lock:
            return [
                CertStatus(
                    str(sid),
                    f"{e.svid.serial:x}" if e.svid else None,
                    e.svid.not_after if e.svid else None,
                    e.due,
                    e.failures,
                    e.last_error,
                )
                for sid, e in sorted(self._entries.items())
            ]

    # ---- the refresh loop ------------------------------------------------------------------
    def next_due(self) -> float | None:
        with self._lock:
            return min((e.due for e in self._entries.values()), default=None)

    def run_due(self) -> int:
        """Fetch every certificate due now, withdraw expired ones; returns how many were renewed."""
        now = self.clock()
        with self._lock:
            due = [sid for sid, e in self._entries.items() if e.due <= now]
        renewed = 0
        for sid in sorted(due):
            renewed += self._refresh(sid)
        self._withdraw_expired()
        self._prune_roots()
        self._write_status()
        return renewed

    def refresh_all(self) -> int:
        """Make every identity due now (an operator-forced rotation); the loop renews them at once.
        Returns how many identities will be renewed."""
        now = self.clock()
        with self._lock:
            for entry in self._entries.values():
                entry.due = now
            n = len(self._entries)
        self._wake.set()
        return n

    def prefetch(self) -> int:
        """Fetch everything that is due now (at start, every identity); same as run_due."""
        return self.run_due()

    def start(self) -> None:
        """Run the loop in a daemon thread using the real clock's passage between checks."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="cert-manager", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_due()
            except Exception:  # a bug must not stop rotation for every other identity
                log.exception("cert manager loop failed; retrying")
            nxt = self.next_due()
            wait = 60.0 if nxt is None else max(0.05, min(60.0, nxt - self.clock()))
            self._wake.wait(wait)
            self._wake.clear()

    # ---- one refresh ----------------------------------------------------------------------
    def _refresh(self, sid: SpiffeId) -> int:
        key = generate_key(self.key_type)
        csr = make_csr(key, sid)
        try:
            result = self.signer.sign(csr, sid, self.ttl)
            svid = self._accept(sid, key, result)
        except (SignError, ValueError) as e:
            self._failed(sid, str(e))
            return 0
        with self._lock:
            entry = self._entries.get(sid)
            if entry is None:  # the pod left while we were asking
                return 0
            entry.svid = svid
            entry.failures = 0
            entry.last_error = None
            entry.withdrawn = False
            life = svid.not_after - svid.not_before
            frac = 0.5 + self.jitter * (2 * self.rng.random() - 1)
            entry.due = svid.not_before + life * frac
        log.info("svid issued identity=%s serial=%x not_after=%s", sid, svid.serial, _iso(svid.not_after))
        self._notify(sid, svid)
        return 1

    def _failed(self, sid: SpiffeId, error: str) -> None:
        with self._lock:
            entry = self._entries.get(sid)
            if entry is None:
                return
            entry.failures += 1
            nominal = min(self.backoff_cap, self.backoff_base * 2 ** (entry.failures - 1))
            entry.due = self.clock() + nominal * (1 - self.jitter * self.rng.random())
            entry.last_error = error
            failures = entry.failures
        log.warning("svid refresh failed identity=%s failures=%d error=%r", sid, failures, error)

    def _accept(self, sid: SpiffeId, key: PrivateKey, result: SignResult) -> Svid:
        """Check the CA's answer before serving it: right SAN, our key, a chain to an announced root."""
        chain = [c for pem in result.chain_pem for c in load_certs_pem(pem, "CA response")]
        leaf = chain[0]
        try:
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise ValueError("CA returned a leaf without subjectAltName") from None
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        if uris != [str(sid)]:
            raise ValueError(f"CA returned a leaf for {uris}, not {sid}")
        if not same_public_key(leaf.public_key(), key.public_key()):
            raise ValueError("CA returned a leaf for a different key")
        announced = [c for pem in result.trust_bundle_pem for c in load_certs_pem(pem, "trust bundle")] or chain[-1:]
        now = self.clock()
        try:
            PolicyBuilder().store(Store(announced)).time(_utc(now)).build_client_verifier().verify(leaf, chain[1:])
        except VerificationError as e:
            raise ValueError(f"CA returned a chain that does not verify: {e}") from None
        self._announce(announced, now)
        # The chain handed to Envoy stops below the root: peers hold the root in their bundle.
        roots = set(announced)
        body = [c for c in chain if c not in roots] or chain[:1]
        return Svid(
            spiffe_id=sid,
            cert_chain_pem="".join(cert_pem(c) for c in body),
            key_pem=key_pem(key),
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            serial=leaf.serial_number,
        )

    # ---- expiry, roots, observers ------------------------------------------------------------
    def _withdraw_expired(self) -> None:
        now = self.clock()
        expired: list[SpiffeId] = []
        with self._lock:
            for sid, e in self._entries.items():
                if e.svid is not None and e.svid.not_after <= now and not e.withdrawn:
                    e.svid = None  # never serve it again; forget its key
                    e.withdrawn = True
                    expired.append(sid)
        for sid in expired:
            log.error("svid expired without renewal identity=%s", sid)
            self._notify(sid, None)

    def _announce(self, roots: list[x509.Certificate], now: float) -> None:
        changed = False
        with self._lock:
            for cert in roots:
                fp = cert.fingerprint(hashes.SHA256())
                if fp in self._roots:
                    self._roots[fp].last_announced = now
                else:
                    self._roots[fp] = _Root(cert, cert_pem(cert), now)
                    changed = True
        if changed:
            self._notify_bundle()

    def _prune_roots(self) -> None:
        now = self.clock()
        with self._lock:
            drop = [
                fp
                for fp, r in self._roots.items()
                if r.cert.not_valid_after_utc.timestamp() <= now or r.last_announced + self.root_grace <= now
            ]
            for fp in drop:
                del self._roots[fp]
        if drop:
            self._notify_bundle()

    def _notify(self, sid: SpiffeId, svid: Svid | None) -> None:
        for cb in list(self._subs):
            try:
                cb(sid, svid)
            except Exception:
                log.exception("svid subscriber failed identity=%s", sid)

    def _notify_bundle(self) -> None:
        bundle = self.trust_bundle_pem()
        for cb in list(self._bundle_subs):
            try:
                cb(bundle)
            except Exception:
                log.exception("trust bundle subscriber failed")

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        doc = {"written_at": self.clock(), "identities": [_status_dict(s) for s in self.status()]}
        tmp = self.status_path.with_name(f".{self.status_path.name}.tmp")
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.status_path)


def _status_dict(s: CertStatus) -> dict[str, object]:
    return {
        "spiffe_id": s.spiffe_id,
        "serial": s.serial,
        "not_after": s.not_after,
        "next_refresh": s.next_refresh,
        "failures": s.failures,
        "last_error": s.last_error,
    }


def load_status(path: str | os.PathLike[str]) -> list[CertStatus]:
    """Read a status file written by a running manager (for `accel certs`)."""
    doc = json.loads(Path(path).read_text())
    return [
        CertStatus(
            str(d["spiffe_id"]),
            d.get("serial"),
            d.get("not_after"),
            float(d["next_refresh"]),
            int(d.get("failures", 0)),
            d.get("last_error"),
        )
        for d in doc["identities"]
    ]


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _iso(ts: float) -> str:
    return _utc(ts).strftime("%Y-%m-%dT%H:%M:%SZ")
