"""The splice guard: spliced sockets must never fill the node's TCP memory (maps.h "splice guard").

The kernel queues a spliced byte at its receiver with no flow control: a receiver slower than its
sender (a consumer that pauses; the node Envoy when the tunnel behind it is the bottleneck) lets its
queue grow until the kernel's TCP memory reaches its pressure mark, and then spliced senders' writes
fail with ENOMEM and every TCP socket of the node is squeezed. A BPF program cannot see how much a
receiver has left unread, but the kernel's TCP memory is one number (/proc/net/sockstat "TCP: ... mem",
in pages, shared by every network namespace). The guard reads it every `interval`: above `high` it raises
the flag (a spliced socket that sends moves to TCP for good, whose window then makes it wait; no new
connection is spliced), below `low` it lowers it. `high` defaults to a quarter of the kernel's tcp_mem low
mark (net.ipv4.tcp_mem[0], far below the pressure mark tcp_mem[1]), `low` to half of `high`: at 5 GB/s
one 20 ms interval adds 100 MB, which stays well under the pressure mark on any node size.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

SOCKSTAT = Path("/proc/net/sockstat")
TCP_MEM = Path("/proc/sys/net/ipv4/tcp_mem")


def tcp_memory_pages(sockstat: Path = SOCKSTAT) -> int:
    """Pages the kernel's TCP sockets hold now (every namespace's)."""
    for line in sockstat.read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    raise ValueError(f"no TCP line in {sockstat}")


def default_high_pages(tcp_mem: Path = TCP_MEM) -> int:
    return max(1, int(tcp_mem.read_text().split()[0]) // 4)


class SpliceGuard:
    """Watches TCP memory and sets the kernel's splice guard through `set_guard(up)`; its own thread."""

    def __init__(self, set_guard: Callable[[bool], None], registry: CollectorRegistry | None = None,
                 high_pages: int | None = None, interval: float = 0.02,
                 read_pages: Callable[[], int] = tcp_memory_pages) -> None:
        self.set_guard = set_guard
        self.high = high_pages if high_pages is not None else default_high_pages()
        self.low = self.high // 2
        self.interval = interval
        self.read_pages = read_pages
        self.up = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.raised = Counter("meshaccel_splice_guard_raised", "Times the splice guard went up (TCP memory high)",
                              registry=registry)
        self.up_gauge = Gauge("meshaccel_splice_guard_up", "1 while the splice guard is up", registry=registry)
        self.pages_gauge = Gauge("meshaccel_tcp_memory_pages", "The kernel's TCP memory, in pages",
                                 registry=registry)
        self.set_guard(False)  # a guard left up by a stopped agent comes down: this one watches now

    def step(self) -> bool:
        """One look: raise or lower the guard as the memory says; whether it is up."""
        pages = self.read_pages()
        self.pages_gauge.set(pages)
        want = pages >= self.high or (self.up and pages > self.low)
        if want != self.up:
            self.set_guard(want)
            self.up = want
            self.up_gauge.set(int(want))
            if want:
                self.raised.inc()
            log.warning("event=splice_guard state=%s tcp_memory_pages=%d high=%d low=%d", "up" if want else "down",
                        pages, self.high, self.low)
        return self.up

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.step()
            except (OSError, ValueError) as e:  # never stop watching; a failed write is retried next time
                log.error("event=splice_guard_failed error=%r", str(e))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="agent-splice-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()
