"""Workload identities: SPIFFE IDs and the stable u32 the kernel uses for each; the security
identities of policy (POLICY.md "Identities") and their number spaces.

A number is a hash of a canonical key (the SPIFFE ID; for a security identity the namespace, service
account and labels), so every agent (and every restart) derives the same number without coordination.
On the rare collision the later key probes to the next free number in its range and that choice is
persisted in the state directory, so a restart reproduces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TRUST_DOMAIN = "cluster.local"
# 0 means "unknown" in the maps; numbers below RESERVED are kept for special identities (host, world).
RESERVED = 256

# Security identities (the policy map's subject and peer numbers, POLICY.md).
ID_ANY = 0  # in a policy key: every peer without entries of its own
ID_HOST = 1  # this node's own addresses (kubelet probes, the node Envoy's upstream connections)
ID_WORLD = 2  # an address that matches no ipcache entry
ID_REMOTE_NODE = 3  # another node's address
RESERVED_SECURITY_IDS = {ID_ANY: "any", ID_HOST: "host", ID_WORLD: "world", ID_REMOTE_NODE: "remote-node"}
CIDR_MIN, CIDR_MAX = 16, 65535  # one per distinct CIDR of any ipBlock (accel/policy)
SECURITY_MIN = 65536  # pod identities: (namespace, service account, labels)
U32_MAX = 2**32 - 1


def spiffe_id(namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def security_key(namespace: str, service_account: str, labels: Mapping[str, str]) -> str:
    """The canonical text a pod's security identity is a hash of (unambiguous for any label text)."""
    return json.dumps([namespace, service_account, sorted(labels.items())], separators=(",", ":"))


def natural_number(spiffe: str, low: int = RESERVED, high: int = U32_MAX) -> int:
    """The number a key gets in [low, high] when nothing collides with it."""
    h = int.from_bytes(hashlib.blake2b(spiffe.encode(), digest_size=8).digest(), "big")
    return low + h % (high - low + 1)


class IdentityAllocator:
    """Key -> u32 in [low, high], deterministic, collision-safe, persisted only where a collision moved
    one. The default range and file are the SPIFFE ID numbers of local_endpoints."""

    def __init__(self, state_dir: Path | None = None, *, low: int = RESERVED, high: int = U32_MAX,
                 file_name: str = "identities.json") -> None:
        self.low, self.high = low, high
        self._by_id: dict[str, int] = {}
        self._by_number: dict[int, str] = {}
        self._path = state_dir / file_name if state_dir is not None else None
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
        num = natural_number(spiffe, self.low, self.high)
        probes = 0
        while num in self._by_number:
            probes += 1
            if probes > self.high - self.low:
                raise OverflowError(f"identity range [{self.low}, {self.high}] is full")
            num = self.low + (num - self.low + 1) % (self.high - self.low + 1)
        self._take(spiffe, num)
        if probes:
            log.warning("event=identity_collision spiffe_id=%s number=%d probes=%d", spiffe, num, probes)
            self._moved[spiffe] = num
            self._save()
        return num

    def spiffe_of(self, number: int) -> str | None:
        return self._by_number.get(number)

    key_of = spiffe_of  # the same for allocators of other keys

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
