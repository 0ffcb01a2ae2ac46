"""gRPC ADS server (State-of-the-World and Delta) over a `SnapshotCache`.

This module knows streams, nonces and ACK/NACK; what resources mean is the cache's business. One
asyncio loop (in its own thread) serves every stream. Per stream:
- at most one un-ACKed response per type; a client that never ACKs just gets nothing more;
- while clusters are not ACKed, or their endpoints not delivered, listeners and routes wait, so a
  route never points at a cluster Envoy is still warming (CDS -> EDS -> LDS -> RDS);
- additions and updates go first; removals only once everything else is ACKed (make before break);
- a NACK (a request whose `error_detail` is set) is recorded, logged and counted, and the same
  content is not sent again: only a new snapshot produces a new response;
- memory is bounded: a few queued requests (then gRPC flow control pushes back), one response in
  flight, subscriptions capped, snapshot changes coalesced into one flag.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge

from meshxds.cache import (
    CLUSTER,
    ENDPOINT,
    FULL_STATE,
    LISTENER,
    ORDER,
    ROUTE,
    SHORT_NAMES,
    Entry,
    Snapshot,
    SnapshotCache,
)
from meshxds.grpc_thread import GrpcThread

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
MAX_QUEUED_REQUESTS = 8
MAX_NAMES_PER_TYPE = 65536
MAX_RECENT_NACKS = 64

NACKS = Counter("meshaccel_xds_nacks_total", "xDS responses rejected by a client (NACK)", ["type"])
RESPONSES = Counter("meshaccel_xds_responses_total", "xDS responses sent", ["type", "api"])
BAD_REQUESTS = Counter("meshaccel_xds_bad_requests_total", "xDS requests refused or ignored", ["reason"])
STREAMS = Gauge("meshaccel_xds_streams", "Open ADS streams")


@dataclass(frozen=True, slots=True)
class NackRecord:
    node_id: str
    type_url: str
    version: str
    nonce: str
    error: str
    at: float


@dataclass(frozen=True, slots=True)
class TypeStatus:
    type_url: str
    subscribed: int
    wildcard: bool
    version_sent: str
    version_acked: str
    awaiting_ack: bool
    nacks: int
    last_error: str


@dataclass(frozen=True, slots=True)
class StreamStatus:
    stream_id: int
    node_id: str
    api: str
    # The snapshot version this stream has nothing more to send for (ACKed or NACKed), else "".
    settled_version: str
    types: tuple[TypeStatus, ...]


@dataclass(frozen=True, slots=True)
class ServerStatus:
    address: str
    streams: tuple[StreamStatus, ...]
    responses_total: int
    nacks_total: int
    bad_requests_total: int
    recent_nacks: tuple[NackRecord, ...]


class _BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


class _TypeState:
    __slots__ = ("wildcard", "names", "sent", "nonce", "awaiting", "ever_sent", "version_sent",
                 "version_acked", "nacked", "nacks", "last_error")

    def __init__(self) -> None:
        self.wildcard = False
        self.names: set[str] = set()
        # What the client was last given (SotW: the last response's content; Delta: what it holds).
        self.sent: dict[str, Entry] = {}
        self.nonce = ""
        self.awaiting = False
        self.ever_sent = False
        self.version_sent = ""
        self.version_acked = ""
        self.nacked = False
        self.nacks = 0
        self.last_error = ""

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


_EOF = object()
_CHANGED = object()


class _Stream:
    """One ADS stream; `delta` picks the protocol variant."""

    def __init__(self, server: XdsServer, stream_id: int, delta: bool) -> None:
        self.server, self.id, self.delta = server, stream_id, delta
        self.api = "delta" if delta else "sotw"
        self.node_id = ""
        self.types: dict[str, _TypeState] = {}
        self.settled_version = ""
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._room = asyncio.Semaphore(MAX_QUEUED_REQUESTS)
        self._change_pending = False
        self._nonce = 0
        self._unknown_logged: set[str] = set()

    # -- input -------------------------------------------------------------------------------
    async def _read(self, requests: AsyncIterator[bytes]) -> None:
        try:
            async for raw in requests:
                await self._room.acquire()
                self._queue.put_nowait(raw)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            self._queue.put_nowait(_EOF)

    def notify(self) -> None:
        """Snapshot changed (called in the server loop); coalesced into at most one queue item."""
        if not self._change_pending:
            self._change_pending = True
            self._queue.put_nowait(_CHANGED)

    # -- main loop ---------------------------------------------------------------------------
    async def run(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        reader = asyncio.ensure_future(self._read(requests))
        cancel_watch = None
        try:
            while True:
                item = await self._queue.get()
                if item is _EOF:
                    return
                if item is _CHANGED:
                    self._change_pending = False
                else:
                    self._room.release()
                    assert isinstance(item, bytes)
                    self._handle(item)
                    if cancel_watch is None and self.node_id:
                        cancel_watch = self.server._watch(self)
                await self._flush(context)
        except _BadRequest as e:
            BAD_REQUESTS.labels(e.reason).inc()
            self.server._count_bad()
            log.warning("event=xds_bad_request stream=%d node=%s reason=%s error=%r", self.id,
                        self.node_id or "-", e.reason, str(e))
            await context.abort(e.code, str(e))
        finally:
            reader.cancel()
            if cancel_watch is not None:
                cancel_watch()

    async def _flush(self, context: grpc.aio.ServicerContext) -> None:
        """Send responses until nothing is due; each write waits for gRPC flow control."""
        while True:
            snap = self.server.cache.get(self.node_id) if self.node_id else None
            resp = self._next(snap)
            if resp is None:
                self.settled_version = snap.version if snap is not None and not self._any_awaiting() else ""
                return
            self.settled_version = ""
            await context.write(resp)

    def _any_awaiting(self) -> bool:
        return any(t.awaiting for t in self.types.values())

    # -- requests ----------------------------------------------------------------------------
    def _handle(self, raw: bytes) -> None:
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        try:
            req: Any = cls.FromString(raw)
        except DecodeError as e:
            raise _BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                              f"could not decode {cls.DESCRIPTOR.name}: {e}", "decode") from None
        if not self.node_id:
            if not req.node.id:
                raise _BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                                  "the first request must carry node.id", "no_node_id")
            self.node_id = req.node.id
        if req.type_url not in SHORT_NAMES:
            if req.type_url not in self._unknown_logged and len(self._unknown_logged) < 16:
                self._unknown_logged.add(req.type_url)
                BAD_REQUESTS.labels("unknown_type").inc()
                self.server._count_bad()
                log.warning("event=xds_unknown_type stream=%d node=%s type_url=%r (ignored)",
                            self.id, self.node_id, req.type_url[:200])
            return
        ts = self.types.get(req.type_url)
        if ts is None:
            ts = self.types[req.type_url] = _TypeState()
        if self.delta:
            self._handle_delta(req, ts)
        else:
            self._handle_sotw(req, ts)

    def _ack_or_nack(self, ts: _TypeState, type_url: str, nonce: str, error: Any, has_error: bool) -> bool:
        """Apply an ACK/NACK if `nonce` answers our latest response; False for a stale nonce."""
        if not nonce:
            return True
        if nonce != ts.nonce:
            return False  # answers an older response: superseded, ignore
        ts.awaiting = False
        if has_error:
            ts.nacked = True
            ts.nacks += 1
            ts.last_error = (error.message or f"code {error.code}")[:1000]
            self.server._record_nack(NackRecord(self.node_id, type_url, ts.version_sent, nonce, ts.last_error,
                                                time.time()))
        else:
            ts.nacked = False
            ts.version_acked = ts.version_sent
        return True

    def _handle_sotw(self, req: discovery_pb2.DiscoveryRequest, ts: _TypeState) -> None:
        if not self._ack_or_nack(ts, req.type_url, req.response_nonce, req.error_detail,
                                 req.HasField("error_detail")):
            return
        names = set(req.resource_names)
        if len(names) > MAX_NAMES_PER_TYPE:
            raise _BadRequest(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{len(names)} resource names exceed the limit {MAX_NAMES_PER_TYPE}", "too_many")
        wildcard = "*" in names or (not names and req.type_url in FULL_STATE)
        names.discard("*")
        # A name the client newly asks for must be (re)sent even if it got it before.
        for n in names - ts.names:
            ts.sent.pop(n, None)
        if wildcard and not ts.wildcard:
            ts.sent.clear()
        ts.wildcard, ts.names = wildcard, names

    def _handle_delta(self, req: discovery_pb2.DeltaDiscoveryRequest, ts: _TypeState) -> None:
        self._ack_or_nack(ts, req.type_url, req.response_nonce, req.error_detail, req.HasField("error_detail"))
        first = not ts.ever_sent and not ts.nonce and not ts.names and not ts.wildcard
        if first:
            # A reconnecting client says what it holds; only differences get sent.
            for n, v in req.initial_resource_versions.items():
                ts.sent[n] = Entry(n, v, _NO_PACKED)
            if not req.resource_names_subscribe and req.type_url in FULL_STATE:
                ts.wildcard = True
        for n in req.resource_names_subscribe:
            if n == "*":
                ts.wildcard = True
            else:
                ts.names.add(n)
                if not first:
                    ts.sent.pop(n, None)
        for n in req.resource_names_unsubscribe:
            if n == "*":
                ts.wildcard = False
            else:
                ts.names.discard(n)
                ts.sent.pop(n, None)
        if len(ts.names) > MAX_NAMES_PER_TYPE:
            raise _BadRequest(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{len(ts.names)} resource names exceed the limit {MAX_NAMES_PER_TYPE}", "too_many")

    # -- responses ---------------------------------------------------------------------------
    def _desired(self, snap: Snapshot, type_url: str, ts: _TypeState) -> dict[str, Entry]:
        entries = snap.entries(type_url)
        if ts.wildcard:
            return dict(entries)
        return {n: entries[n] for n in ts.names if n in entries}

    def _endpoints_delivered(self, snap: Snapshot) -> bool:
        """Every EDS name of the clusters the client holds has been delivered at the current version."""
        cds = self.types.get(CLUSTER)
        if cds is None:
            return True
        eds = self.types.get(ENDPOINT) or _TypeState()
        entries = snap.entries(ENDPOINT)
        for cluster in cds.sent:
            name = snap.eds_of_cluster.get(cluster)
            if name is None or name not in entries:
                continue
            got = eds.sent.get(name)
            if got is None or got.version != entries[name].version:
                return False
        return not eds.awaiting

    def _next(self, snap: Snapshot | None) -> Any:
        if snap is None:
            return None
        blocked: set[str] = set()
        # Phase 1: additions and updates, in order.
        for type_url in ORDER:
            ts = self.types.get(type_url)
            if ts is None or type_url in blocked:
                continue
            if ts.awaiting:
                if type_url == CLUSTER:
                    blocked |= {LISTENER, ROUTE}
                continue
            if type_url in (LISTENER, ROUTE) and not self._endpoints_delivered(snap):
                blocked |= {LISTENER, ROUTE}
                continue
            desired = self._desired(snap, type_url, ts)
            if self.delta:
                changed = {n: e for n, e in desired.items() if ts.sent.get(n, _MISSING).version != e.version}
                if changed or (ts.wildcard and not ts.ever_sent):
                    return self._delta_response(snap, type_url, ts, changed, [])
            else:
                content = dict(desired)
                if type_url in FULL_STATE:
                    # Keep what is going away until everything else is in place.
                    for n, e in ts.sent.items():
                        if n not in content and (ts.wildcard or n in ts.names):
                            content[n] = e
                    due = _versions(content) != _versions(ts.sent)
                else:
                    due = any(ts.sent.get(n, _MISSING).version != e.version for n, e in desired.items())
                if due or (ts.wildcard and not ts.ever_sent):
                    return self._sotw_response(snap, type_url, ts, content)
        # Phase 2: removals, in reverse order, once nothing is pending or rejected.
        if self._any_awaiting() or any(t.nacked for t in self.types.values()):
            return None
        for type_url in reversed(ORDER):
            ts = self.types.get(type_url)
            if ts is None:
                continue
            desired = self._desired(snap, type_url, ts)
            gone = [n for n in ts.sent if n not in desired]
            if not gone:
                continue
            if self.delta:
                return self._delta_response(snap, type_url, ts, {}, gone)
            if type_url in FULL_STATE:
                return self._sotw_response(snap, type_url, ts, desired)
            for n in gone:  # SotW EDS/RDS/SDS: forgetting is enough, the client unsubscribes itself
                del ts.sent[n]
        return None

    def _new_nonce(self, ts: _TypeState, type_url: str, version: str) -> str:
        self._nonce += 1
        ts.nonce = str(self._nonce)
        ts.awaiting, ts.ever_sent, ts.version_sent = True, True, version
        RESPONSES.labels(SHORT_NAMES[type_url], self.api).inc()
        self.server._count_response()
        return ts.nonce

    def _invalidate_dependents(self, snap: Snapshot, type_url: str, changed: list[str]) -> None:
        # A changed cluster/listener is rebuilt by Envoy and re-requests its endpoints/routes.
        dep = snap.dependents(type_url, changed)
        if dep is not None and dep[0] in self.types:
            for n in dep[1]:
                self.types[dep[0]].sent.pop(n, None)

    def _sotw_response(self, snap: Snapshot, type_url: str, ts: _TypeState,
                       content: dict[str, Entry]) -> discovery_pb2.DiscoveryResponse:
        changed = [n for n, e in content.items() if n in ts.sent and ts.sent[n].version != e.version]
        self._invalidate_dependents(snap, type_url, changed)
        nonce = self._new_nonce(ts, type_url, snap.version)
        ts.sent = content
        return discovery_pb2.DiscoveryResponse(
            version_info=snap.version, type_url=type_url, nonce=nonce,
            resources=[e.packed for e in content.values()],
        )

    def _delta_response(self, snap: Snapshot, type_url: str, ts: _TypeState, changed: dict[str, Entry],
                        removed: list[str]) -> discovery_pb2.DeltaDiscoveryResponse:
        self._invalidate_dependents(snap, type_url, [n for n in changed if n in ts.sent])
        nonce = self._new_nonce(ts, type_url, snap.version)
        ts.sent.update(changed)
        for n in removed:
            ts.sent.pop(n, None)
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=snap.version, type_url=type_url, nonce=nonce,
            resources=[discovery_pb2.Resource(name=e.name, version=e.version, resource=e.packed)
                       for e in changed.values()],
            removed_resources=removed,
        )

    def status(self) -> StreamStatus:
        return StreamStatus(
            stream_id=self.id, node_id=self.node_id, api=self.api, settled_version=self.settled_version,
            types=tuple(
                TypeStatus(type_url=t, subscribed=len(s.names), wildcard=s.wildcard, version_sent=s.version_sent,
                           version_acked=s.version_acked, awaiting_ack=s.awaiting, nacks=s.nacks,
                           last_error=s.last_error)
                for t, s in sorted(self.types.items())
            ),
        )


_MISSING = Entry("", "", None)  # type: ignore[arg-type]
_NO_PACKED: Any = None


def _versions(entries: Mapping[str, Entry]) -> dict[str, str]:
    return {n: e.version for n, e in entries.items()}


class XdsServer:
    """ADS over gRPC on 127.0.0.1:PORT or unix:PATH. `start()` returns the bound address."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self._grpc = GrpcThread("xds-server", "xDS server", self._add_handlers, [
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ])
        self._streams: dict[int, _Stream] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self._responses = 0
        self._nacks = 0
        self._bad = 0
        self._recent: collections.deque[NackRecord] = collections.deque(maxlen=MAX_RECENT_NACKS)

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return self._grpc.address

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        return self._grpc.loop

    def start(self, address: str = "127.0.0.1:0") -> str:
        """Bind and serve in a background thread. `address`: "HOST:PORT" (0 = any free) or "unix:PATH"."""
        return self._grpc.start(address)

    def _add_handlers(self, server: grpc.aio.Server) -> None:
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw, request_deserializer=None, response_serializer=_serialize),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta, request_deserializer=None, response_serializer=_serialize),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving: open streams get `grace` seconds, then are cancelled."""
        self._grpc.stop(grace)

    def __enter__(self) -> XdsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- streams -------------------------------------------------------------------------------
    async def _sotw(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await self._run_stream(requests, context, delta=False)

    async def _delta(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await self._run_stream(requests, context, delta=True)

    async def _run_stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext,
                          delta: bool) -> None:
        with self._lock:
            self._next_id += 1
            stream = _Stream(self, self._next_id, delta)
            self._streams[stream.id] = stream
        STREAMS.inc()
        try:
            await stream.run(requests, context)
        finally:
            STREAMS.dec()
            with self._lock:
                del self._streams[stream.id]

    def _watch(self, stream: _Stream) -> Any:
        loop = self._loop
        assert loop is not None

        def changed(_node: str) -> None:
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                loop.call_soon_threadsafe(stream.notify)

        return self.cache.watch(stream.node_id, changed)

    # -- accounting ----------------------------------------------------------------------------
    def _record_nack(self, rec: NackRecord) -> None:
        NACKS.labels(SHORT_NAMES.get(rec.type_url, "other")).inc()
        with self._lock:
            self._nacks += 1
            self._recent.append(rec)
        log.warning("event=xds_nack node=%s type=%s version=%s nonce=%s error=%r", rec.node_id,
                    SHORT_NAMES.get(rec.type_url, rec.type_url), rec.version, rec.nonce, rec.error[:300])

    def _count_response(self) -> None:
        with self._lock:
            self._responses += 1

    def _count_bad(self) -> None:
        with self._lock:
            self._bad += 1

    def status(self) -> ServerStatus:
        """A consistent view for `accel status` and tests: built on the server loop, which owns the streams."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._grpc.thread is threading.current_thread():
            return self._status_now()

        async def collect() -> ServerStatus:
            return self._status_now()

        try:
            return asyncio.run_coroutine_threadsafe(collect(), loop).result(10)
        except RuntimeError:  # loop stopped meanwhile
            return self._status_now()

    def _status_now(self) -> ServerStatus:
        with self._lock:
            streams = list(self._streams.values())
            counts = (self._responses, self._nacks, self._bad, tuple(self._recent))
        return ServerStatus(
            address=self.address,
            streams=tuple(s.status() for s in streams),
            responses_total=counts[0], nacks_total=counts[1], bad_requests_total=counts[2],
            recent_nacks=counts[3],
        )

    def settled(self, node_id: str, version: str) -> bool:
        """True when some stream of `node_id` has nothing left to send for snapshot `version`."""
        sts = [s for s in self.status().streams if s.node_id == node_id]
        return bool(sts) and all(s.settled_version == version for s in sts)


def _serialize(msg: Any) -> bytes:
    return bytes(msg.SerializeToString())
