"""`GET /flows` on the agent's HTTP port: the recent flows, or a live stream of them, as JSON lines.

Query parameters: the filters of `FlowFilter` (`pod namespace identity service verdict port since`,
each may repeat), `follow=1` to keep streaming new flows, `last=N` (how many recent flows first;
default 20, or 0 when following), `all=1` for every kept flow. One JSON object per line, a flow as
`accel.flows.flow_json` writes it; while following, a line `{"lost_events": N, "time": T}` says N
more flows matched but were dropped because this reader fell behind.

A bad parameter gets 400 and one line saying what to fix. The response is close-delimited (HTTP/1.0):
nothing is buffered beyond one batch. A client that goes away is noticed on the next write or, when
no flow comes, within `poll_seconds` (the socket turns readable at EOF), and its subscription is
dropped: a vanished reader costs a thread for at most that long and never blocks a producer; one
that stops reading without closing is dropped once a write has been blocked `write_timeout` seconds.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler

import orjson

from accel.flows import FilterError, FlowFilter, FlowStore, Subscription, TooManySubscribers, flow_json

DEFAULT_LAST = 20
CONTROL = ("follow", "last", "all")


def _truthy(values: list[str]) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes", "")


def parse_request(query: str, now: float | None = None) -> tuple[FlowFilter, bool, int | None]:
    """(filter, follow, how many recent flows first: None = all); raises FilterError."""
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    follow = _truthy(params.pop("follow", []))
    all_ = _truthy(params.pop("all", []))
    last_values = params.pop("last", [])
    last: int | None = 0 if follow else DEFAULT_LAST
    if last_values:
        v = last_values[-1]
        if not v.isdigit():
            raise FilterError(f"last={v!r} is not a number of flows (0 or more)")
        last = int(v)
    if all_:
        last = None
    return FlowFilter.parse(params, now), follow, last


def peer_gone(sock: socket.socket) -> bool:
    """True once the client closed its side (readable with nothing to read) or the socket failed."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


class FlowStreams:
    """Serves /flows for one store; counts the streams it serves."""

    def __init__(self, store: FlowStore, stop: threading.Event, poll_seconds: float = 0.5,
                 write_timeout: float = 10.0) -> None:
        self.store = store
        self.stop = stop
        self.poll_seconds = poll_seconds
        self.write_timeout = write_timeout
        self._lock = threading.Lock()
        self.open_streams = 0
        self.streams_served = 0

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        _, _, query = handler.path.partition("?")
        try:
            flt, follow, last = parse_request(query)
        except FilterError as e:
            _plain(handler, 400, f"{e}\n")
            return
        # A reader that stops reading without closing (gone, partitioned) fills the socket
        # buffers; the blocked write then fails after this long and the response is dropped.
        handler.connection.settimeout(self.write_timeout)
        if not follow:
            flows = self.store.recent(flt, last)
            self._start(handler)
            with contextlib.suppress(OSError):
                for i in range(0, len(flows), 256):
                    handler.wfile.write(b"".join(flow_json(f) + b"\n" for f in flows[i:i + 256]))
            return
        try:
            sub = self.store.subscribe(flt, backlog=last or 0)
        except TooManySubscribers as e:
            _plain(handler, 503, f"{e}\n")
            return
        with self._lock:
            self.open_streams += 1
            self.streams_served += 1
        try:
            self._start(handler)
            self._follow(handler, sub)
        finally:
            sub.close()
            with self._lock:
                self.open_streams -= 1

    def _start(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-ndjson")
        handler.send_header("X-Flows-Kept", str(len(self.store)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.flush()

    def _follow(self, handler: BaseHTTPRequestHandler, sub: Subscription) -> None:
        reported = 0
        sock = handler.connection
        while not self.stop.is_set():
            batch = sub.get(self.poll_seconds)
            if batch is None:  # the store closed it: the agent is stopping
                return
            lines = [flow_json(f) + b"\n" for f in batch]
            if sub.dropped != reported:
                lines.append(orjson.dumps({"lost_events": sub.dropped - reported, "time": time.time()}) + b"\n")
                reported = sub.dropped
            try:
                if lines:
                    handler.wfile.write(b"".join(lines))
                elif peer_gone(sock):
                    return
            except OSError:  # the client went away mid-write
                return


def _plain(handler: BaseHTTPRequestHandler, code: int, text: str) -> None:
    body = text.encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "text/plain; charset=utf-8")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
