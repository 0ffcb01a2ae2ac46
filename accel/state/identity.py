"""Workload identities: SPIFFE IDs and the stable u32 the kernel uses for each.

The number is a hash of the SPIFFE ID, so every agent (and every restart) derives the same number
without coordination. On the rare collision the later identity probes to the next free number and
that choice is persisted in the state directory, so a restart reproduces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TRUST_DOMAIN = "cluster.local"
# 0 means "unknown" in the maps; numbers below RESERVED are kept for special identities (host, world).
RESERVED = 256
_SPACE = 2**32 - RESERVED


def spiffe_id(namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def natural_number(spiffe: str) -> int:
    """The number an identity gets when nothing collides with it."""
    h = int.from_bytes(hashlib.blake2b(spiffe.encode(), digest_size=8).digest(), "big")
    return RESERVED + h % _SPACE


class IdentityAllocator:
    """SPIFFE ID -> u32, deterministic, collision-safe, persisted only where a collision moved one."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self._by_id: dict[str, int] = {}
        self._by_number: dict[int, str] = {}
        self._path = state_dir / "identities.json" if state_dir is not None else None
        self._moved: dict[str, int] = {}
        if self._path is not None and self._path.exists():
            try:
                saved = json.loads(self._path.read_text())
                for sid, num in saved.items():
                    self._take(str(sid), int(num))
                    self._moved[str(sid)] = int(num)
            except (ValueError, AttributeError, OSError) as e:
                log.error("event=identity_state_unreadable path=%s error=%r fallback=rehash", self._path, str(e))

    def _take(self, sid: str, num: int) -> None:
        self._by_id[sid] = num
        self._by_number[num] = sid

    def number(self, spiffe: str) -> int:
        num = self._by_id.get(spiffe)
        if num is not None:
            return num
        num = natural_number(spiffe)
        probes = 0
        while num in self._by_number:
            probes += 1
            num = RESERVED + (num - RESERVED + 1) % _SPACE
        self._take(spiffe, num)
        if probes:
            log.warning("event=identity_collision spiffe_id=%s number=%d probes=%d", spiffe, num, probes)
            self._moved[spiffe] = num
            self._save()
        return num

    def spiffe_of(self, number: int) -> str | None:
        return self._by_number.get(number)

    def _save(self) -> None:
        if self._path is None:
            return
        tmp = self._path.with_suffix(".tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._moved, sort_keys=True))
            os.replace(tmp, self._path)
        except OSError as e:
            log.error("event=identity_state_write_failed path=%s error=%r", self._path, str(e))
