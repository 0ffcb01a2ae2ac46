"""gRPC Access Log Service server (envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs):
where Envoy streams its access log entries (configured by `meshxds/access_log.py`).

It knows the protocol, not what an entry means: every message, with the identifier of its stream
(sent by Envoy only on a stream's first message), is handed to `on_message`, which runs on the
server's loop (its own thread) and must be quick. A message that does not parse is counted and
skipped; the stream goes on. An exception in `on_message` is counted and logged, never ends the
stream. Memory per stream: one message at a time (gRPC flow control pushes back on Envoy, which
then buffers and drops on its side), messages capped at `max_message_bytes`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

from meshxds.grpc_thread import GrpcThread

log = logging.getLogger(__name__)

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StreamIdentity:
    """Who sends on a stream: Envoy's node id and the access log's `log_name`."""

    stream_id: int
    node_id: str
    log_name: str


@dataclass(frozen=True, slots=True)
class AlsStatus:
    address: str
    streams: int
    messages: int
    http_entries: int
    tcp_entries: int
    malformed_messages: int
    handler_errors: int


OnMessage = Callable[[StreamIdentity, als_pb2.StreamAccessLogsMessage], None]


class AccessLogServer:
    """`start(address)` binds ("HOST:PORT", port 0 = any free, or "unix:PATH") and serves from a
    thread of its own; `stop()` ends open streams after `grace` seconds."""

    def __init__(self, on_message: OnMessage, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.on_message = on_message
        self.max_message_bytes = max_message_bytes
        self._grpc = GrpcThread("als-server", "access log server", self._add_handlers,
                                [("grpc.max_receive_message_length", max_message_bytes)])
        self._lock = threading.Lock()
        self._next_id = 0
        self._streams = 0
        self._messages = 0
        self._http = 0
        self._tcp = 0
        self._malformed = 0
        self._handler_errors = 0

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return self._grpc.address

    def start(self, address: str = "127.0.0.1:0") -> str:
        return self._grpc.start(address)

    def _add_handlers(self, server: grpc.aio.Server) -> None:
        handler = grpc.stream_unary_rpc_method_handler(
            self._stream, request_deserializer=None, response_serializer=_serialize)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "StreamAccessLogs": handler}),))

    def stop(self, grace: float = 1.0) -> None:
        self._grpc.stop(grace)

    def alive(self) -> bool:
        return self._grpc.alive()

    def __enter__(self) -> AccessLogServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one stream ----------------------------------------------------------------------------
    async def _stream(self, requests: AsyncIterator[bytes],
                      context: grpc.aio.ServicerContext) -> als_pb2.StreamAccessLogsResponse:
        with self._lock:
            self._next_id += 1
            self._streams += 1
            ident = StreamIdentity(self._next_id, "", "")
        try:
            async for raw in requests:
                msg = als_pb2.StreamAccessLogsMessage()
                try:
                    msg.ParseFromString(raw)
                except DecodeError as e:
                    self._count(malformed=1)
                    log.warning("event=als_malformed_message stream=%d node=%s bytes=%d error=%r",
                                ident.stream_id, ident.node_id or "-", len(raw), str(e))
                    continue
                if msg.HasField("identifier"):
                    ident = StreamIdentity(ident.stream_id, msg.identifier.node.id, msg.identifier.log_name)
                self._count(messages=1, http=len(msg.http_logs.log_entry), tcp=len(msg.tcp_logs.log_entry))
                try:
                    self.on_message(ident, msg)
                except Exception:  # a bug in the consumer must not end Envoy's stream
                    self._count(errors=1)
                    log.exception("event=als_handler_failed stream=%d node=%s", ident.stream_id, ident.node_id)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            with self._lock:
                self._streams -= 1
        return als_pb2.StreamAccessLogsResponse()

    def _count(self, *, messages: int = 0, http: int = 0, tcp: int = 0, malformed: int = 0, errors: int = 0) -> None:
        with self._lock:
            self._messages += messages
            self._http += http
            self._tcp += tcp
            self._malformed += malformed
            self._handler_errors += errors

    def status(self) -> AlsStatus:
        with self._lock:
            return AlsStatus(self.address, self._streams, self._messages, self._http, self._tcp,
                             self._malformed, self._handler_errors)


def _serialize(msg: als_pb2.StreamAccessLogsResponse) -> bytes:
    return bytes(msg.SerializeToString())
