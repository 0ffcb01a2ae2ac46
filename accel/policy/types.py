"""The compiler's output records: what the kernel's policy map and ipcache hold (mirrors of the C key
and value, POLICY.md), the rule table that explains every entry, problems, and map diffs."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from accel.state.model import ObjectKey

ANY_PORT_PREFIXLEN = 80  # bits of subject, peer, direction and proto: the port's prefix bits come on top


class Verdict(enum.IntEnum):
    ALLOW = 1
    DENY = 2


class Direction(enum.IntEnum):
    INGRESS = 0  # peer -> subject; the port is the subject's
    EGRESS = 1  # subject -> peer; the port is the peer's


class PolicyKey(NamedTuple):
    """`struct policy_key`: LPM on (subject, peer, direction, proto, port's first `port_bits` bits).
    `port` is the first port of the prefix (its low 16 - port_bits bits are zero)."""

    subject: int
    peer: int  # 0 = ANY: every peer without entries of its own
    direction: int
    proto: int
    port: int
    port_bits: int  # 0 (any port of proto) .. 16 (one port)

    @property
    def prefixlen(self) -> int:
        return ANY_PORT_PREFIXLEN + self.port_bits


class PolicyValue(NamedTuple):
    """`struct policy_value`."""

    verdict: int  # Verdict
    rule: int  # index into the rule table


# Rule table indices that are no policy's rule.
RULE_NONE = 0  # evaluate(): no entry matched at all (the subject is not isolated, nothing denies)
RULE_DEFAULT_ALLOW = 1  # a peer's entry saying "allowed as if no policy applied" where ANY is decided
RULE_HOST = 2  # traffic between a pod and its own node is always allowed (Kubernetes NetworkPolicy)
FIRST_POLICY_RULE = 16


@dataclass(frozen=True, slots=True)
class RuleRef:
    """Which rule of which object: `part` is e.g. "ingress[0]", "egress[2]", "rules[1]", "default-deny"
    (NetworkPolicy isolation) or "allow-policies-exist" (an Istio ALLOW policy applies, none matched)."""

    kind: str
    namespace: str
    name: str
    part: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name} {self.part}" if self.name else self.part


@dataclass(frozen=True, slots=True)
class RuleInfo:
    index: int
    ref: RuleRef
    verdict: Verdict
    text: str  # one line: what the rule says


@dataclass(frozen=True, slots=True)
class Problem:
    """Bad input: `reason` is a short metric label, `message` one line naming the object."""

    reason: str
    object: ObjectKey
    message: str


class MapOp(NamedTuple):
    """One write for the lead's map writer: `value` None deletes `key`.
    map "policy": PolicyKey -> PolicyValue; map "ipcache": CIDR text -> identity (IPv4 stored mapped)."""

    map: str
    key: PolicyKey | str
    value: PolicyValue | int | None


POLICY_MAP = "policy"
IPCACHE_MAP = "ipcache"


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    """What one change did to the maps, in the order to write it: every intermediate state gives each
    (subject, peer, port) either its old or its new verdict, never a third one (see compiler.py)."""

    ops: tuple[MapOp, ...] = ()
    subjects: tuple[int, ...] = ()  # subjects recompiled
    problems: tuple[Problem, ...] = ()  # problems new with this change

    @property
    def empty(self) -> bool:
        return not self.ops

    def policy_writes(self) -> int:
        return sum(1 for op in self.ops if op.map == POLICY_MAP)


@dataclass(frozen=True, slots=True)
class Compiled:
    """Everything the kernel and the explainers need, as read-only views (of the compiler's live
    tables: read them in the thread that feeds the compiler, or copy)."""

    entries: Mapping[PolicyKey, PolicyValue]
    ipcache: Mapping[str, int]  # CIDR text -> CIDR identity (pod and node entries are the agent's)
    rules: Mapping[int, RuleInfo]
    problems: tuple[Problem, ...]
