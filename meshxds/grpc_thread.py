"""A grpc.aio server on an asyncio loop in a thread of its own: the ADS server and the access log server
both run this way, so the agent's other threads never wait on a stream."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc


class GrpcThread:
    """`start(address)` binds ("HOST:PORT", port 0 = any free, or "unix:PATH"), serves from its thread and
    returns the bound address; `stop(grace)` gives open streams `grace` seconds, then cancels them.
    `add_handlers(server)` registers the services before the server starts."""

    def __init__(self, name: str, what: str, add_handlers: Callable[[grpc.aio.Server], None],
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self.name = name  # the thread's name
        self.what = what  # for errors: "xDS server", "access log server"
        self.add_handlers = add_handlers
        self.options = list(options)
        self.address = ""
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's loop, once started
        self.thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._grace = 1.0

    def start(self, address: str) -> str:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                loop.run_until_complete(self._serve(address, ready))
            except BaseException as e:  # reported to start()
                errors.append(e)
                ready.set()
            finally:
                loop.close()

        self.thread = threading.Thread(target=run, name=self.name, daemon=True)
        self.thread.start()
        ready.wait(30)
        if errors:
            raise RuntimeError(f"{self.what} could not start on {address}: {errors[0]}")
        return self.address

    async def _serve(self, address: str, ready: threading.Event) -> None:
        server = grpc.aio.server(options=self.options)
        self.add_handlers(server)
        port = server.add_insecure_port(address)
        if address.startswith("unix:"):
            self.address = address
        else:
            if port == 0:
                raise RuntimeError("bind failed")
            self.address = f"{address.rsplit(':', 1)[0]}:{port}"
        await server.start()
        self._stopping = asyncio.Event()
        ready.set()
        await self._stopping.wait()
        await server.stop(self._grace)

    def stop(self, grace: float = 1.0) -> None:
        loop, stopping = self.loop, self._stopping
        self._grace = grace
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if self.thread is not None:
            self.thread.join(grace + 10)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()
