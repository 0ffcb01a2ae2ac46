"""The splice guard: a spliced sender whose receiver stops reading must be made to wait, as TCP would make
it, not fill the node's TCP memory until its writes fail with ENOMEM (maps.h "splice guard",
accel/splice_guard.py)."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from accel.lab import Lab
from accel.lab_agent import LabAgent
from accel.splice_guard import PEAK_SPLICE_RATE, SpliceGuard, tcp_memory_pages
from sockops_bpf import loader
from sockops_bpf.maps import open_pinned
from tests import waiting
from tests.conftest import leftovers, require


def test_budget_is_what_the_memory_has_left_under_the_mark() -> None:
    pages = [0]
    budgets: list[int] = []
    guard = SpliceGuard(budgets.append, high_pages=1000, read_pages=lambda: pages[0])
    for p, up in ((10, False), (999, False), (1000, True), (1500, True), (500, False)):
        pages[0] = p
        guard.step()
        assert guard.up is up, p
    assert budgets == [990 * 4096, 4096, 0, 0, 500 * 4096]
    assert guard.raised._value.get() == 1  # type: ignore[attr-defined]


def test_looks_come_sooner_as_the_budget_shrinks() -> None:
    guard = SpliceGuard(lambda _: None, high_pages=1000, read_pages=lambda: 0)
    assert guard.interval(0) == guard.min_interval == 0.005  # spent: look again soon
    assert guard.interval(1 << 30) == pytest.approx((1 << 30) / (2 * PEAK_SPLICE_RATE))  # 27 ms
    assert guard.interval(1 << 40) == guard.max_interval == 0.1  # roomy: an idle agent does not spin


def test_tcp_memory_is_read_from_sockstat() -> None:
    assert tcp_memory_pages() >= 0


# The server takes one connection, reads nothing until told (a line on stdin), then reads to the end and
# prints how many bytes it got and their SHA-256.
SERVER = r"""
import hashlib, socket, sys
s = socket.create_server(("0.0.0.0", 7400))
print("listening", flush=True)
c, _ = s.accept()
sys.stdin.readline()
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    h.update(b)
    n += len(b)
print(n, h.hexdigest(), flush=True)
"""

# The client sends SIZE bytes of a fixed pseudo-random pattern, printing its progress every 64 MiB.
CLIENT = r"""
import random, socket, sys, time
size = int(sys.argv[2])
block = random.Random(7).randbytes(1 << 20)
c = socket.create_connection((sys.argv[1], 7400))
sent = 0
while sent < size:
    c.sendall(block)
    sent += len(block)
    if sent % (64 << 20) == 0:
        print(sent, time.monotonic(), flush=True)
c.close()
print("done", sent, flush=True)
"""


@pytest.fixture
def guarded_lab() -> Iterator[tuple[Lab, LabAgent]]:
    import os

    require(os.geteuid() == 0, "needs root for eBPF, cgroups and network namespaces")
    lab = Lab(2)
    lab.up()
    try:
        # A mark 64 MiB above what the node's TCP sockets hold now, so the test moves little data (the default
        # is half of tcp_mem's low mark).
        mark = tcp_memory_pages() + 16384
        with LabAgent(lab, agent_args=("--splice-guard-pages", str(mark))) as agent:
            yield lab, agent
    finally:
        lab.down()
    assert leftovers(lab.id) == []


@pytest.mark.lab
@pytest.mark.slow
def test_a_sender_whose_receiver_stops_reading_waits_instead_of_failing(guarded_lab: tuple[Lab, LabAgent]) -> None:
    lab, agent = guarded_lab
    size = 1 << 30
    server = lab.popen("pod2", [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       text=True)
    client: subprocess.Popen[str] | None = None
    peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.01):
            peak[0] = max(peak[0], tcp_memory_pages())
    sampler = threading.Thread(target=sample, daemon=True)
    try:
        assert server.stdout is not None and server.stdin is not None
        assert server.stdout.readline().strip() == "listening"
        before = tcp_memory_pages()
        sampler.start()
        client = lab.popen("pod1", [sys.executable, "-c", CLIENT, lab.pod("pod2").ipv4, str(size)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert client.stdout is not None
        # The receiver reads nothing: the budget runs out and the sender is made to wait by TCP.
        with open_pinned(loader.pin_dir(lab.node("node1").instance)) as maps:
            waiting.wait_until(lambda: maps.counters()["guard_to_tcp"] >= 1, 30, "the sender moved to TCP")
            assert maps.counters()["guard_not_spliced"] == 0  # it was spliced, then moved
        time.sleep(1.0)  # deliberate: the sender has had a full second to fill memory, were it free to
        assert client.poll() is None, "the client finished while its receiver read nothing"
        server.stdin.write("read\n")
        server.stdin.flush()
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0 and f"done {size}" in out, err[-500:]
        got = server.communicate(timeout=120)[0].split()
    finally:
        sampling.set()
        for p in (server, client):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    block, want = random.Random(7).randbytes(1 << 20), hashlib.sha256()
    for _ in range(size // len(block)):
        want.update(block)
    assert got == [str(size), want.hexdigest()]  # every byte, in order: spliced first, then TCP
    # Memory stayed under the guard's mark (64 MiB; racing verdicts may overdraw by a MiB each), far from
    # the kernel's pressure mark; other tests on the machine may add their own share.
    assert (peak[0] - before) * 4096 < 160 << 20, (before, peak[0])
    assert agent.status()["splice_guard"]["high_pages"] >= 16384
