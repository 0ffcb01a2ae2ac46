"""SPIFFE IDs: parse, format, and the two shapes we issue.

Workload IDs are `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` (the form Istio uses); node agents get
`spiffe://<trust-domain>/meshaccel/node/<node>`, a path a workload CSR can never ask for.
Parsing follows the SPIFFE ID spec (lower-case trust domain, no port/userinfo/query/fragment, no
empty, `.` or `..` segments) so that two spellings can never name the same identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TRUST_DOMAIN = "cluster.local"
MAX_ID_LENGTH = 2048  # SPIFFE spec: IDs longer than this must be rejected

_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_NODE_PREFIX = ("meshaccel", "node")


class SpiffeIdError(ValueError):
    """The text is not a valid SPIFFE ID; the message says which part is wrong."""


def check_trust_domain(td: str) -> str:
    if not td or len(td) > 255 or not _TRUST_DOMAIN_RE.match(td):
        raise SpiffeIdError(f"trust domain {td!r} must be 1-255 characters of a-z 0-9 . - _")
    return td


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    trust_domain: str
    path: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if len(text) > MAX_ID_LENGTH:
            raise SpiffeIdError(f"SPIFFE ID is {len(text)} characters; the limit is {MAX_ID_LENGTH}")
        scheme, sep, rest = text.partition("://")
        if not sep or scheme != "spiffe":
            raise SpiffeIdError(f"{_short(text)} is not a SPIFFE ID (must start with spiffe://)")
        td, slash, path = rest.partition("/")
        if any(c in td for c in "@:"):
            raise SpiffeIdError(f"{_short(text)}: trust domain must not carry a port or user info")
        check_trust_domain(td)
        if not slash or not path:
            raise SpiffeIdError(f"{_short(text)}: a workload SPIFFE ID needs a path")
        if any(c in path for c in "?#"):
            raise SpiffeIdError(f"{_short(text)}: query and fragment are not allowed")
        segments = tuple(path.split("/"))
        for seg in segments:
            if seg in ("", ".", "..") or not _SEGMENT_RE.match(seg):
                raise SpiffeIdError(
                    f"{_short(text)}: path segment {seg!r} is empty, a dot segment, or has characters outside A-Z a-z 0-9 . - _"
                )
        return cls(td, segments)

    @classmethod
    def workload(cls, namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
        return cls.parse(f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")

    @classmethod
    def node(cls, node_name: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
        return cls.parse(f"spiffe://{trust_domain}/{_NODE_PREFIX[0]}/{_NODE_PREFIX[1]}/{node_name}")

    @property
    def is_workload(self) -> bool:
        return len(self.path) == 4 and self.path[0] == "ns" and self.path[2] == "sa"

    @property
    def node_name(self) -> str | None:
        """The node name if this is a node-agent ID, else None."""
        if len(self.path) == 3 and self.path[:2] == _NODE_PREFIX:
            return self.path[2]
        return None

    @property
    def namespace(self) -> str:
        if not self.is_workload:
            raise SpiffeIdError(f"{self} is not a workload ID (spiffe://<td>/ns/<ns>/sa/<sa>)")
        return self.path[1]

    @property
    def service_account(self) -> str:
        if not self.is_workload:
            raise SpiffeIdError(f"{self} is not a workload ID (spiffe://<td>/ns/<ns>/sa/<sa>)")
        return self.path[3]

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/{'/'.join(self.path)}"


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")
