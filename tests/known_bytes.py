"""Connections that move a known number of bytes each way and check every one of them, run inside lab
pods (`python -m tests.known_bytes serve|send|http-serve|http-send`), so a test can hold the byte counts of
a flow against what really crossed.

Every byte is `pattern(n)`'s: a receiver checks what it got against the pattern of that length.
- `serve LOG PORT:REPLY ...`: per connection, read to the client's EOF, answer REPLY bytes, close; append
  "port peer_ip peer_port received ok|bad" to LOG.
- `send IP PORT BYTES [COUNT]`: COUNT connections, one after the other: send BYTES (the first
  `FIRST_SEND` in a sendmsg() of their own), shut down the write side, read to EOF. Prints one JSON list:
  per connection {"sport", "sent", "received", "ok"} or {"error": errno name}.
- `http-serve LOG PORT REPLY`: HTTP/1.1; a POST's body is checked, the answer has a REPLY-byte body.
- `http-send IP PORT BODY`: one `POST /upload` with `Connection: close`; prints {"sport", "sent" (the
  request's bytes on the wire), "received" (the response's), "status", "body", "ok", "via_envoy"}.
"""

from __future__ import annotations

import errno
import http.server
import json
import socket
import sys
import threading
from typing import Any

FIRST_SEND = 1000
_PATTERN = bytes(range(251))  # a prime length: shifted copies do not line up


def pattern(n: int) -> bytes:
    return (_PATTERN * (n // len(_PATTERN) + 1))[:n]


def _read_all(s: socket.socket) -> bytes:
    got = bytearray()
    while chunk := s.recv(65536):
        got += chunk
    return bytes(got)


def _error(e: OSError) -> dict[str, Any]:
    return {"error": errno.errorcode.get(e.errno or 0, type(e).__name__)}


def serve(log_path: str, specs: list[str]) -> None:
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - open for the life of the process
    lock = threading.Lock()

    def handle(c: socket.socket, peer: tuple[str, int], port: int, reply: int) -> None:
        with c:
            data = _read_all(c)
            c.sendall(pattern(reply))
        with lock:
            log.write(f"{port} {peer[0]} {peer[1]} {len(data)} {'ok' if data == pattern(len(data)) else 'bad'}\n")

    def accept(s: socket.socket, port: int, reply: int) -> None:
        while True:
            c, peer = s.accept()
            threading.Thread(target=handle, args=(c, peer, port, reply), daemon=True).start()

    for spec in specs:
        port, reply = (int(x) for x in spec.split(":"))
        s = socket.create_server(("0.0.0.0", port), backlog=1024)
        threading.Thread(target=accept, args=(s, port, reply), daemon=True).start()
    print("listening", flush=True)
    threading.Event().wait()


def send(ip: str, port: int, size: int, count: int) -> list[dict[str, Any]]:
    data = pattern(size)
    out: list[dict[str, Any]] = []
    for _ in range(count):
        try:
            with socket.create_connection((ip, port), timeout=10) as s:
                sport = s.getsockname()[1]
                s.sendall(data[:FIRST_SEND])
                s.sendall(data[FIRST_SEND:])
                s.shutdown(socket.SHUT_WR)
                got = _read_all(s)
            out.append({"sport": sport, "sent": size, "received": len(got), "ok": got == pattern(len(got))})
        except OSError as e:
            out.append(_error(e))
    return out


def http_serve(log_path: str, port: int, reply: int) -> None:
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - open for the life of the process

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            log.write(f"{port} {self.client_address[0]} {len(body)} {'ok' if body == pattern(len(body)) else 'bad'}\n")
            self.send_response(200)
            self.send_header("Content-Length", str(reply))
            self.end_headers()
            self.wfile.write(pattern(reply))

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print("listening", flush=True)
    server.serve_forever()


def http_send(ip: str, port: int, size: int) -> dict[str, Any]:
    request = (f"POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
               .encode() + pattern(size))
    try:
        with socket.create_connection((ip, port), timeout=10) as s:
            sport = s.getsockname()[1]
            s.sendall(request)
            raw = _read_all(s)
    except OSError as e:
        return _error(e)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return {"sport": sport, "sent": len(request), "received": len(raw), "status": status, "body": len(body),
            "ok": body == pattern(len(body)), "via_envoy": b"x-envoy-upstream-service-time" in head.lower()}


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "serve":
        serve(args[0], args[1:])
    elif cmd == "send":
        print(json.dumps(send(args[0], int(args[1]), int(args[2]), int(args[3]) if len(args) > 3 else 1)))
    elif cmd == "http-serve":
        http_serve(args[0], int(args[1]), int(args[2]))
    elif cmd == "http-send":
        print(json.dumps(http_send(args[0], int(args[1]), int(args[2]))))
    else:
        print(f"known_bytes: unknown command {cmd!r}; use serve, send, http-serve or http-send", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
