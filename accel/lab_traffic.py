"""Traffic that checks itself, run inside lab pods: `python -m accel.lab_traffic serve|connect`.

Each connection starts with a 16-byte header from the client (connection id, number of messages the
server must send, seed of the server's message sizes). Then both sides send random-sized messages of
random bytes while reading, and each prints, per connection, the SHA-256 of everything it sent and
everything it received, as JSON lines. A test compares the two sides bit for bit.

--half-close: the client sends all its data and shuts down its write side first; the server starts
sending only after it has read the client's EOF, so bytes flow to a half-closed socket.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import socket
import struct
import sys

HEADER = struct.Struct("!IIQ")  # conn id, messages the server sends, server seed
CHUNK = 1 << 16


def sizes(seed: int, count: int, max_size: int) -> list[int]:
    """Log-uniform sizes in [1, max_size]: many small messages and some very large ones."""
    rng = random.Random(seed)
    return [max(1, min(max_size, int(math.exp(rng.uniform(0, math.log(max_size)))))) for _ in range(count)]


async def _send(writer: asyncio.StreamWriter, seed: int, count: int, max_size: int, h: hashlib._Hash,
                pause: float) -> int:
    rng = random.Random(seed ^ 0x5EED)
    total = 0
    for size in sizes(seed, count, max_size):
        data = rng.randbytes(size)
        h.update(data)
        writer.write(data)
        await writer.drain()
        total += size
        if pause:
            await asyncio.sleep(pause)
    return total


async def _recv(reader: asyncio.StreamReader, h: hashlib._Hash) -> int:
    total = 0
    while chunk := await reader.read(CHUNK):
        h.update(chunk)
        total += len(chunk)
    return total


def _emit(role: str, conn: int, sent: hashlib._Hash, sent_n: int, recv: hashlib._Hash, recv_n: int) -> None:
    print(json.dumps({"role": role, "id": conn, "sent_sha256": sent.hexdigest(), "sent_bytes": sent_n,
                      "recv_sha256": recv.hexdigest(), "recv_bytes": recv_n}), flush=True)


async def serve(host: str, port: int, conns: int, max_size: int, half_close: bool, pause: float) -> None:
    done = asyncio.Event()
    left = conns

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal left
        conn, count, seed = HEADER.unpack(await reader.readexactly(HEADER.size))
        sent, recv = hashlib.sha256(), hashlib.sha256()
        if half_close:
            recv_n = await _recv(reader, recv)
            sent_n = await _send(writer, seed, count, max_size, sent, pause)
        else:
            recv_task = asyncio.create_task(_recv(reader, recv))
            sent_n = await _send(writer, seed, count, max_size, sent, pause)
            recv_n = await recv_task
        writer.write_eof()
        await writer.drain()
        writer.close()
        _emit("server", conn, sent, sent_n, recv, recv_n)
        left -= 1
        if left == 0:
            done.set()

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = await asyncio.start_server(handle, host, port, family=family, backlog=1024, limit=CHUNK)
    print(json.dumps({"role": "server", "listening": port}), flush=True)
    async with server:
        await done.wait()


async def connect_all(host: str, port: int, conns: int, msgs: int, max_size: int, seed: int,
                      half_close: bool, pause: float) -> None:
    async def one(conn: int) -> None:
        reader, writer = await asyncio.open_connection(host, port, limit=CHUNK)
        my_seed, server_seed = seed * 1_000_003 + conn * 2, seed * 1_000_003 + conn * 2 + 1
        writer.write(HEADER.pack(conn, msgs, server_seed))
        sent, recv = hashlib.sha256(), hashlib.sha256()
        recv_task = asyncio.create_task(_recv(reader, recv))
        sent_n = await _send(writer, my_seed, msgs, max_size, sent, pause)
        writer.write_eof()  # shutdown(SHUT_WR): the server may still be sending
        await writer.drain()
        recv_n = await recv_task
        writer.close()
        _emit("client", conn, sent, sent_n, recv, recv_n)

    await asyncio.gather(*(one(i) for i in range(conns)))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m accel.lab_traffic")
    ap.add_argument("mode", choices=["serve", "connect"])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--msgs", type=int, default=4, help="messages each side sends per connection")
    ap.add_argument("--max-size", type=int, default=4 << 20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--half-close", action="store_true")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between messages (long-lived streams)")
    a = ap.parse_args(argv)
    if a.mode == "serve":
        asyncio.run(serve(a.host, a.port, a.conns, a.max_size, a.half_close, a.pause))
    else:
        asyncio.run(connect_all(a.host, a.port, a.conns, a.msgs, a.max_size, a.seed, a.half_close, a.pause))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
