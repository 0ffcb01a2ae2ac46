"""Flows: one record per connection event (opened, closed, refused) or per L7 request, whatever
produced it (the kernel's ring buffer, Envoy's access log), and the bounded store the agent keeps
them in.

Producers call `FlowStore.append(flow)` / `extend(flows)` from their own threads. The store keeps the
last `capacity` flows (a ring: the oldest goes when a new one comes), calls its observers (the Istio
metrics) for every flow in the producer's thread, and offers each flow to the live subscriptions
whose filter it matches. A subscription has a bounded queue: when its reader is slow or gone, new
flows for it are dropped and counted, so no reader ever blocks a producer.

`FlowFilter` is the one reading of `accel observe`'s filters (`--pod --namespace --identity
--service --verdict --port --since`), used by the agent's /flows endpoint and by the CLI alike:
values of one filter are alternatives (OR), different filters must all hold (AND), as in
`hubble observe`. Pods, namespaces, identities and ports match either end of a flow.
"""

from __future__ import annotations

import calendar
import collections
import dataclasses
import datetime
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

log = logging.getLogger(__name__)

EMPTY: Mapping[str, str] = MappingProxyType({})
EVENTS = ("open", "close", "refused")
VERDICTS = ("forwarded", "denied", "refused")
PATHS = ("spliced", "tcp", "tunnel", "l7", "udp")
DEFAULT_CAPACITY = 100_000
DEFAULT_QUEUE = 10_000  # flows a subscriber may fall behind by before its flows are dropped
DEFAULT_MAX_SUBSCRIBERS = 64


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a flow, as the agent could resolve it."""

    ip: str
    port: int
    pod: str = ""  # "namespace/name" when the address is a known pod
    workload: str = ""  # Istio's workload name: the owner (Deployment, ...), else the pod's `app` label, else its name
    namespace: str = ""
    identity: str = ""  # SPIFFE ID ("spiffe://td/ns/NS/sa/SA"), "" if not a mesh workload
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY, hash=False)  # the pod's labels ("app", "version": Istio's canonical service)


@dataclass(frozen=True, slots=True)
class Flow:
    time: float  # unix seconds of the event (for a close or an L7 request: when it ended)
    event: str  # "open" | "close" | "refused"  (an L7 request from Envoy is "close")
    source: str  # "kernel" | "envoy"
    proto: str  # "TCP" | "UDP"
    src: Endpoint
    dst: Endpoint  # the backend actually reached (after service load balancing)
    path: str  # "spliced" | "tcp" | "tunnel" | "l7" | "udp"
    encrypted: bool  # True on the mTLS tunnel (and L7 over it)
    verdict: str  # "forwarded" | "denied" | "refused"
    reason: str = ""  # denied/refused: "policy" | "strict_plaintext" | "no_backend" | "no_service" | "tunnel_401" | ...
    policy: str = ""  # the rule that denied: "NetworkPolicy/ns/name[2]" or "AuthorizationPolicy/ns/name[0]"
    service: str = ""  # "namespace/name" when the connection was to a ClusterIP (or an L7 service)
    service_ip: str = ""
    service_port: int = 0
    cookie: int = 0  # the kernel's socket cookie (0 for Envoy flows)
    bytes_sent: int = 0  # source -> destination, on close
    bytes_received: int = 0  # destination -> source, on close
    bytes_exact: bool = True  # False when the kernel only knows a lower bound (spliced sockets)
    duration_seconds: float = 0.0  # on close
    http_method: str = ""  # L7 only
    http_path: str = ""
    http_status: int = 0
    route: str = ""
    response_flags: str = ""  # Envoy's, e.g. "UF", "URX", "-"


def into_l7_proxy(flow: Flow) -> bool:
    """A kernel flow of a connection into the node Envoy's L7 listener. Envoy reports each of its requests
    (with the backend it reached), so the metrics and the map count those, not this connection to the proxy."""
    return flow.source == "kernel" and flow.path == "l7"


# --- JSON: one flow per line, for the HTTP stream and `accel observe --output json` -------------------

def _default(obj: object) -> object:
    if isinstance(obj, Mapping):  # labels (a read-only mapping)
        return dict(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def flow_json(flow: Flow) -> bytes:
    """One JSON object (no newline); fields as in `Flow`, endpoints nested."""
    return orjson.dumps(flow, default=_default)


_FLOW_FIELDS = frozenset(f.name for f in dataclasses.fields(Flow))
_ENDPOINT_FIELDS = frozenset(f.name for f in dataclasses.fields(Endpoint))


def flow_from_dict(doc: Mapping[str, Any]) -> Flow:
    """The inverse of `flow_json` (unknown keys ignored, so an older client reads a newer agent).
    Raises ValueError when a required field is missing or mistyped."""
    try:
        kw = {k: v for k, v in doc.items() if k in _FLOW_FIELDS}
        for end in ("src", "dst"):
            e = {k: v for k, v in doc[end].items() if k in _ENDPOINT_FIELDS}
            e["labels"] = MappingProxyType(dict(e.get("labels") or {}))
            kw[end] = Endpoint(**e)
        return Flow(**kw)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not a flow: {e}") from None


# --- filters -------------------------------------------------------------------------------------

class FilterError(ValueError):
    """A filter value that cannot be read; the message names the option and says what is expected."""


FILTER_OPTIONS = ("pod", "namespace", "identity", "service", "verdict", "port", "since")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATIONS = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


def parse_since(text: str, now: float) -> float:
    """A duration back from `now` ("90s", "5m", "1h30m") or a time: unix seconds or ISO 8601
    ("2025-01-02T15:04:05Z"; without a zone it is UTC)."""
    t = text.strip()
    if _DURATIONS.fullmatch(t):
        return now - sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(t))
    try:
        return float(t)
    except ValueError:
        pass
    try:
        dt = datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(f"--since {text!r} is not a duration (30s, 5m, 1h30m) or a time "
                          "(2025-01-02T15:04:05Z, or unix seconds)") from None
    if dt.tzinfo is None:
        return float(calendar.timegm(dt.timetuple())) + dt.microsecond / 1e6
    return dt.timestamp()


def _check_pod(v: str) -> str:
    ns, _, name = v.rpartition("/")
    if "/" in ns or not name or (ns and not _NAME.fullmatch(ns)):
        raise FilterError(f"--pod {v!r} is not [NAMESPACE/]NAME (a pod name or the start of one)")
    return v


def _check_namespace(v: str) -> str:
    if not _NAME.fullmatch(v):
        raise FilterError(f"--namespace {v!r} is not a namespace name (lower-case letters, digits, '-')")
    return v


def _check_service(v: str) -> str:
    ns, _, name = v.rpartition("/")
    if "/" in ns or not _NAME.fullmatch(name) or (ns and not _NAME.fullmatch(ns)):
        raise FilterError(f"--service {v!r} is not [NAMESPACE/]NAME of a Service")
    return v


def _check_identity(v: str) -> str:
    if not v.startswith("spiffe://") or "/" not in v.removeprefix("spiffe://"):
        raise FilterError(f"--identity {v!r} is not a SPIFFE ID (spiffe://cluster.local/ns/NS/sa/SA)")
    return v


def _check_verdict(v: str) -> str:
    if v.lower() not in VERDICTS:
        raise FilterError(f"--verdict {v!r} is not one of {', '.join(VERDICTS)}")
    return v.lower()


def _check_port(v: str) -> int:
    if not v.isdigit() or not 1 <= int(v) <= 65535:
        raise FilterError(f"--port {v!r} is not a port number (1-65535)")
    return int(v)


@dataclass(frozen=True, slots=True)
class FlowFilter:
    pods: tuple[str, ...] = ()  # "ns/name-prefix" (that namespace) or "name-prefix" (any namespace)
    namespaces: tuple[str, ...] = ()
    identities: tuple[str, ...] = ()  # SPIFFE IDs
    services: tuple[str, ...] = ()  # "ns/name" or "name" (any namespace)
    verdicts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()  # either end's port, or the service port
    since: float | None = None  # unix seconds

    @classmethod
    def parse(cls, values: Mapping[str, Sequence[str]], now: float | None = None) -> FlowFilter:
        """From option name -> values (query parameters, CLI flags); raises FilterError."""
        unknown = sorted(set(values) - set(FILTER_OPTIONS))
        if unknown:
            raise FilterError(f"unknown filter {unknown[0]!r}; filters are: {', '.join(FILTER_OPTIONS)}")
        since = values.get("since") or []
        return cls(
            pods=tuple(_check_pod(v) for v in values.get("pod", ())),
            namespaces=tuple(_check_namespace(v) for v in values.get("namespace", ())),
            identities=tuple(_check_identity(v) for v in values.get("identity", ())),
            services=tuple(_check_service(v) for v in values.get("service", ())),
            verdicts=tuple(_check_verdict(v) for v in values.get("verdict", ())),
            ports=tuple(_check_port(v) for v in values.get("port", ())),
            since=max(parse_since(v, time.time() if now is None else now) for v in since) if since else None,
        )

    def query(self) -> list[tuple[str, str]]:
        """As query parameters for the agent's /flows (what `parse` reads back)."""
        q = [("pod", v) for v in self.pods] + [("namespace", v) for v in self.namespaces]
        q += [("identity", v) for v in self.identities] + [("service", v) for v in self.services]
        q += [("verdict", v) for v in self.verdicts] + [("port", str(v)) for v in self.ports]
        if self.since is not None:
            q.append(("since", repr(self.since)))
        return q

    def empty(self) -> bool:
        return not (self.pods or self.namespaces or self.identities or self.services or self.verdicts
                    or self.ports or self.since is not None)

    def matches(self, f: Flow) -> bool:
        if self.since is not None and f.time < self.since:
            return False
        if self.verdicts and f.verdict not in self.verdicts:
            return False
        if self.namespaces and f.src.namespace not in self.namespaces and f.dst.namespace not in self.namespaces:
            return False
        if self.identities and f.src.identity not in self.identities and f.dst.identity not in self.identities:
            return False
        if self.ports and not (f.src.port in self.ports or f.dst.port in self.ports
                               or (f.service_port and f.service_port in self.ports)):
            return False
        if self.services and not (f.service and any(_service_match(s, f.service) for s in self.services)):
            return False
        return not self.pods or any(_pod_match(p, f.src.pod) or _pod_match(p, f.dst.pod) for p in self.pods)


def _pod_match(want: str, pod: str) -> bool:
    if not pod:
        return False
    if "/" in want:
        return pod.startswith(want)
    return pod.partition("/")[2].startswith(want)


def _service_match(want: str, service: str) -> bool:
    return service == want if "/" in want else service.partition("/")[2] == want


# --- the store -----------------------------------------------------------------------------------

class TooManySubscribers(RuntimeError):
    pass


class Subscription:
    """A live view: flows matching `filter` as they come, up to `maxlen` waiting; beyond that new
    ones are dropped and counted in `dropped` (the reader sees the count, never a blocked producer)."""

    def __init__(self, store: FlowStore, flt: FlowFilter, maxlen: int, backlog: Iterable[Flow] = ()) -> None:
        self.filter = flt
        self.maxlen = maxlen
        self.dropped = 0
        self.closed = False
        self._store = store
        self._queue: collections.deque[Flow] = collections.deque(backlog)
        self._cond = threading.Condition(threading.Lock())

    def _offer(self, flow: Flow) -> None:
        """Called by producers (under the store's lock): never blocks beyond this short lock."""
        with self._cond:
            if len(self._queue) >= self.maxlen:
                self.dropped += 1
                return
            self._queue.append(flow)
            self._cond.notify()

    def get(self, timeout: float) -> list[Flow] | None:
        """What is waiting (oldest first), after up to `timeout` seconds; [] if nothing came, None once closed."""
        with self._cond:
            if not self._queue and not self.closed:
                self._cond.wait(timeout)
            if not self._queue:
                return None if self.closed else []
            out = list(self._queue)
            self._queue.clear()
            return out

    def close(self) -> None:
        """Unsubscribe (idempotent): waiting flows are forgotten, a blocked get() returns."""
        self._store._remove(self)
        with self._cond:
            self.closed = True
            self._queue.clear()
            self._cond.notify_all()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Observer = Callable[[Flow], None]


class FlowStore:
    """The last `capacity` flows, thread-safe; see the module docstring."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, *, queue_size: int = DEFAULT_QUEUE,
                 max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS) -> None:
        if capacity < 0:
            raise ValueError(f"flow store capacity {capacity} is negative")
        self.capacity = capacity
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self._ring: collections.deque[Flow] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self._observers: list[Observer] = []
        self._closed = False
        self.appended = 0  # flows ever appended
        self.observer_errors = 0
        self.subscriber_drops = 0  # flows dropped for slow subscribers, summed over closed ones too

    def add_observer(self, fn: Observer) -> None:
        """`fn(flow)` for every appended flow, in the producer's thread (outside the store's lock)."""
        self._observers.append(fn)

    def append(self, flow: Flow) -> None:
        self.extend((flow,))

    def extend(self, flows: Iterable[Flow]) -> None:
        """Append a batch (one lock round for a ring-buffer poll or an access-log message)."""
        batch = flows if isinstance(flows, (list, tuple)) else list(flows)
        if not batch:
            return
        with self._lock:
            self._ring.extend(batch)
            self.appended += len(batch)
            for sub in self._subs:
                flt = sub.filter
                for f in batch:
                    if flt.matches(f):
                        sub._offer(f)
        for fn in self._observers:
            for f in batch:
                try:
                    fn(f)
                except Exception:  # an observer's bug must not reach the producer
                    self.observer_errors += 1
                    if self.observer_errors == 1 or self.observer_errors % 10000 == 0:
                        log.exception("event=flow_observer_failed errors=%d", self.observer_errors)

    def recent(self, flt: FlowFilter | None = None, limit: int | None = None) -> list[Flow]:
        """The newest `limit` flows matching `flt` (all when None), oldest first."""
        with self._lock:
            flows = list(self._ring)
        out: list[Flow] = []
        for f in reversed(flows):
            if flt is None or flt.matches(f):
                out.append(f)
                if limit is not None and len(out) >= limit:
                    break
        out.reverse()
        return out

    def subscribe(self, flt: FlowFilter | None = None, backlog: int = 0, queue_size: int | None = None) -> Subscription:
        """A live subscription, starting with the newest `backlog` matching flows; taken under the
        lock, so no flow is seen twice or missed between the backlog and the live part."""
        flt = flt or FlowFilter()
        maxlen = queue_size or self.queue_size
        with self._lock:
            if self._closed:
                raise TooManySubscribers("the flow store is closed (the agent is stopping)")
            if len(self._subs) >= self.max_subscribers:
                raise TooManySubscribers(f"{len(self._subs)} flow subscribers already; try again later")
            start: list[Flow] = []
            if backlog > 0:
                for f in reversed(self._ring):
                    if flt.matches(f):
                        start.append(f)
                        if len(start) >= min(backlog, maxlen):
                            break
                start.reverse()
            sub = Subscription(self, flt, maxlen, start)
            self._subs.append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
                self.subscriber_drops += sub.dropped

    def close(self) -> None:
        """End every subscription (agent stop); appends still work, new subscriptions are refused."""
        with self._lock:
            self._closed = True
            subs = list(self._subs)
        for s in subs:
            s.close()

    def __len__(self) -> int:
        return len(self._ring)

    def stats(self) -> dict[str, int]:
        with self._lock:
            live_drops = sum(s.dropped for s in self._subs)
            return {"kept": len(self._ring), "capacity": self.capacity, "appended": self.appended,
                    "subscribers": len(self._subs), "subscriber_drops": self.subscriber_drops + live_drops,
                    "observer_errors": self.observer_errors}
