"""The splice guard: spliced sockets must never fill the node's TCP memory (maps.h "splice budget").

The kernel queues a spliced byte at its receiver with no flow control: a receiver slower than its
sender (a consumer that pauses; the node Envoy behind a slow tunnel, which is why a proxy leg moves to
TCP once it sends bulk, maps.h "proxy leg") lets its
queue grow until the kernel's TCP memory reaches its pressure mark, and then spliced senders' writes
fail with ENOMEM and every TCP socket of the node is squeezed. A BPF program cannot see how much a
receiver has left unread, but the kernel's TCP memory is one number (/proc/net/sockstat "TCP: ... mem",
in pages, shared by every network namespace). At each look the guard sets the kernel's splice budget to
what that memory has left under `high`: the kernel splices at most that much before the next look, so
the memory stays under `high` however fast a sender writes and however late this thread runs (a starved
or dead watcher stops the splicing, never the memory limit). Out of budget, senders move to TCP for good
and nothing new is spliced. The next look comes before a node splicing at PEAK_SPLICE_RATE could spend
half the budget (5 ms to 100 ms): a roomy budget needs few looks, so an idle agent does not spin.
`high` defaults to half the kernel's tcp_mem low mark (net.ipv4.tcp_mem[0], under which the kernel does
not regulate TCP memory at all; its pressure mark, where ENOMEM begins, is tcp_mem[1]): splicing stops
well before the node's TCP memory gets tight, and stays on while a busy node's ordinary TCP buffers use
less.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from sockops_bpf.errors import BpfError

log = logging.getLogger(__name__)

SOCKSTAT = Path("/proc/net/sockstat")
TCP_MEM = Path("/proc/sys/net/ipv4/tcp_mem")
PAGE = 4096  # sockstat and tcp_mem count pages of this size (SK_MEM_QUANTUM)
# What a node's spliced senders together may move per second, for pacing the looks; measured here: 8.3 GB/s
# with 4 streams on 2 cores. A faster node spends the budget early and moves senders to TCP, never over `high`.
PEAK_SPLICE_RATE = 20e9


def tcp_memory_pages(sockstat: Path = SOCKSTAT) -> int:
    """Pages the kernel's TCP sockets hold now (every namespace's)."""
    for line in sockstat.read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    raise ValueError(f"no TCP line in {sockstat}")


def default_high_pages(tcp_mem: Path = TCP_MEM) -> int:
    return max(1, int(tcp_mem.read_text().split()[0]) // 2)


class SpliceGuard:
    """Sets the kernel's splice budget through `set_budget(bytes)`, in its own thread, every `interval(budget)`."""

    def __init__(self, set_budget: Callable[[int], None], registry: CollectorRegistry | None = None,
                 high_pages: int | None = None, min_interval: float = 0.005, max_interval: float = 0.1,
                 read_pages: Callable[[], int] = tcp_memory_pages) -> None:
        self.set_budget = set_budget
        self.high = high_pages if high_pages is not None else default_high_pages()
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.read_pages = read_pages
        self.up = False  # the budget is spent: no splicing until the memory goes down
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.raised = Counter("meshaccel_splice_guard_raised",
                              "Times the splice budget ran out (the node's TCP memory reached the guard's mark)",
                              registry=registry)
        self.up_gauge = Gauge("meshaccel_splice_guard_up", "1 while the splice budget is spent", registry=registry)
        self.pages_gauge = Gauge("meshaccel_tcp_memory_pages", "The kernel's TCP memory, in pages",
                                 registry=registry)

    def step(self) -> int:
        """One look: set the budget to what the TCP memory has left under the mark; that budget."""
        pages = self.read_pages()
        self.pages_gauge.set(pages)
        budget = max(0, self.high - pages) * PAGE
        self.set_budget(budget)
        up = budget == 0
        if up != self.up:
            self.up = up
            self.up_gauge.set(int(up))
            if up:
                self.raised.inc()
            log.warning("event=splice_guard state=%s tcp_memory_pages=%d high=%d", "up" if up else "down",
                        pages, self.high)
        return budget

    def interval(self, budget: int) -> float:
        """Seconds to the next look: before PEAK_SPLICE_RATE could spend half of `budget`."""
        return min(self.max_interval, max(self.min_interval, budget / (2 * PEAK_SPLICE_RATE)))

    def _loop(self) -> None:
        budget = 0
        while not self._stop.wait(self.interval(budget)):
            try:
                budget = self.step()
            except (OSError, ValueError, BpfError) as e:  # never stop watching; the next look retries
                budget = 0
                log.error("event=splice_guard_failed error=%r", str(e))

    def start(self) -> None:
        try:
            self.step()  # a budget from the first moment (a stale one a stopped watcher left is replaced)
        except (OSError, ValueError, BpfError) as e:
            log.error("event=splice_guard_failed error=%r", str(e))
        self._thread = threading.Thread(target=self._loop, name="agent-splice-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()
