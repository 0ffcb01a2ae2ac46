"""Problems reported on the object they are about, as Kubernetes Events (`kubectl describe` and
`kubectl get events` show them next to the object), for the agent when its source is the API server.

One Event per (object, reason): created the first time, patched (count, last time, message) when the
problem is heard again, at most once per `repeat_seconds`. Sending is off the caller's thread (the
agent's apply loop never waits on the API server): a bounded queue, a token bucket across all Events,
and a bounded table of the Events it made. Events are best effort: what cannot be sent is counted and
logged (rate-limited), never retried in a loop. Needs `events: create, patch` in the core group.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from accel.state.model import Kind, ObjectKey
from accel.state.parse import API_KINDS

log = logging.getLogger(__name__)

COMPONENT = "meshaccel-agent"
CLUSTER_SCOPED_EVENTS_NAMESPACE = "default"  # where Kubernetes puts Events about cluster-scoped objects


def event_reason(reason: str) -> str:
    """Our metric labels (snake_case) as Event reasons (CamelCase, as kubelet and controllers write them)."""
    return "".join(part[:1].upper() + part[1:] for part in reason.split("_") if part)


def event_name(key: ObjectKey, reason: str) -> str:
    """Stable per (object, reason): an agent restart patches the Event it made before."""
    digest = hashlib.sha256(f"{key.kind}/{key.namespace}/{key.name}/{reason}".encode()).hexdigest()[:16]
    return f"{key.name[:200]}.{digest}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class _Sent:
    name: str
    namespace: str
    count: int = 0  # times heard
    created: bool = False
    last_sent: float = float("-inf")
    message: str = ""


class EventReporter:
    """`report(reason, object, message)` is an ObjectProblemReporter (ClusterState's on_object_problem,
    PolicyCompiler's on_problem). `uid_of` names the object's metadata.uid (kubectl describe matches
    Events by it), e.g. `lambda k: getattr(state.get(k), "uid", "")`."""

    def __init__(self, api_client: client.ApiClient, *, host: str = "", component: str = COMPONENT,
                 uid_of: Callable[[ObjectKey], str] | None = None, rate_per_second: float = 5.0, burst: int = 20,
                 repeat_seconds: float = 300.0, max_queue: int = 1000, max_events: int = 10_000,
                 request_timeout: float = 10.0) -> None:
        self.api = client.CoreV1Api(api_client)
        self.host = host
        self.component = component
        self.uid_of = uid_of
        self.rate = rate_per_second
        self.burst = burst
        self.repeat_seconds = repeat_seconds
        self.max_events = max_events
        self.request_timeout = request_timeout
        self._queue: queue.Queue[tuple[str, ObjectKey, str]] = queue.Queue(max_queue)
        self._sent: OrderedDict[tuple[ObjectKey, str], _Sent] = OrderedDict()
        self._pending: set[tuple[ObjectKey, str]] = set()
        self._tokens = float(burst)
        self._refill_at = time.monotonic()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error_log = float("-inf")
        self.stats = {"created": 0, "patched": 0, "dropped": 0, "failed": 0}

    # --- the caller's side ----------------------------------------------------------------------

    def report(self, reason: str, key: ObjectKey, message: str) -> None:
        try:
            self._queue.put_nowait((reason, key, message))
            self._idle.clear()
        except queue.Full:
            self.stats["dropped"] += 1

    def start(self) -> EventReporter:
        self._thread = threading.Thread(target=self._run, name="event-reporter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once everything reported so far has been sent or given up on (tests)."""
        return self._idle.wait(timeout)

    # --- the sender ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reason, key, message = self._queue.get(timeout=0.5)
            except queue.Empty:
                self._flush_due()
                if self._queue.empty() and not self._due():
                    self._idle.set()
                continue
            self._heard(reason, key, message)
            self._flush_due()
            if self._queue.empty() and not self._due():
                self._idle.set()

    def _heard(self, reason: str, key: ObjectKey, message: str) -> None:
        mark = (key, reason)
        sent = self._sent.get(mark)
        if sent is None:
            ns = key.namespace or CLUSTER_SCOPED_EVENTS_NAMESPACE
            sent = self._sent[mark] = _Sent(event_name(key, reason), ns)
            if len(self._sent) > self.max_events:
                old, _ = self._sent.popitem(last=False)
                self._pending.discard(old)
        else:
            self._sent.move_to_end(mark)
        sent.count += 1
        sent.message = message
        self._pending.add(mark)

    def _flush_due(self) -> None:
        now = time.monotonic()
        for mark in sorted(self._pending, key=lambda m: self._sent[m].last_sent):
            sent = self._sent[mark]
            if now - sent.last_sent < self.repeat_seconds:
                continue
            if not self._take_token():
                break
            self._pending.discard(mark)
            self._send(*mark, sent)

    def _due(self) -> bool:
        """Some Event waits only for a token (not for its repeat interval)."""
        now = time.monotonic()
        return any(now - self._sent[m].last_sent >= self.repeat_seconds for m in self._pending)

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._refill_at) * self.rate)
        self._refill_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _send(self, key: ObjectKey, reason: str, sent: _Sent) -> None:
        sent.last_sent = time.monotonic()
        now = _now()
        try:
            if not sent.created:
                try:
                    body = self._body(key, reason, sent, now)
                    self.api.create_namespaced_event(sent.namespace, body,  # type: ignore[arg-type]  # dicts go as they are
                                                     _request_timeout=self.request_timeout)
                    self.stats["created"] += 1
                except ApiException as e:
                    if e.status != 409:
                        raise
                    # Made before this agent started (same name): update it instead.
                    self._patch(sent, {"lastTimestamp": now, "message": sent.message})
                sent.created = True
            else:
                self._patch(sent, {"count": sent.count, "lastTimestamp": now, "message": sent.message})
        except (ApiException, HTTPError, OSError) as e:
            self.stats["failed"] += 1
            if time.monotonic() - self._last_error_log > 10:
                self._last_error_log = time.monotonic()
                status = getattr(e, "status", None)
                log.warning("event=kube_event_failed object=%s reason=%s status=%s error=%r action=dropped "
                            "(check the agent's RBAC: events create, patch)", key, reason, status, str(e)[:200])

    def _patch(self, sent: _Sent, body: dict[str, Any]) -> None:
        self.api.patch_namespaced_event(sent.name, sent.namespace, body, _request_timeout=self.request_timeout,
                                        _content_type="application/merge-patch+json")
        self.stats["patched"] += 1

    def _body(self, key: ObjectKey, reason: str, sent: _Sent, now: str) -> dict[str, Any]:
        kind = API_KINDS.get(Kind(key.kind))
        involved: dict[str, Any] = {"kind": str(key.kind), "name": key.name,
                                    "apiVersion": kind.group_version if kind else "v1"}
        if key.namespace:
            involved["namespace"] = key.namespace
        uid = self.uid_of(key) if self.uid_of is not None else ""
        if uid:
            involved["uid"] = uid
        return {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": sent.name, "namespace": sent.namespace},
            "involvedObject": involved,
            "reason": event_reason(reason), "message": sent.message[:1024], "type": "Warning",
            "count": sent.count, "firstTimestamp": now, "lastTimestamp": now,
            "source": {"component": self.component, "host": self.host},
            "reportingComponent": self.component, "reportingInstance": self.host or self.component,
        }
