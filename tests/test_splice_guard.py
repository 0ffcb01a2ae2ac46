"""The splice guard: a spliced sender whose receiver stops reading must be made to wait, as TCP would make
it, not fill the node's TCP memory until its writes fail with ENOMEM (maps.h "splice guard",
accel/splice_guard.py)."""

from __future__ import annotations

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
from tests.paused_reader import PausedTransfer


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
    peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.01):
            peak[0] = max(peak[0], tcp_memory_pages())
    sampler = threading.Thread(target=sample, daemon=True)
    try:
        with PausedTransfer(lab, "pod2", "pod1", size) as transfer:
            before = tcp_memory_pages()
            sampler.start()
            transfer.start()
            # The receiver reads nothing: the budget runs out and the sender is made to wait by TCP.
            with open_pinned(loader.pin_dir(lab.node("node1").instance)) as maps:
                waiting.wait_until(lambda: maps.counters()["guard_to_tcp"] >= 1, 30, "the sender moved to TCP")
                assert maps.counters()["guard_not_spliced"] == 0  # it was spliced, then moved
            time.sleep(1.0)  # deliberate: the sender has had a full second to fill memory, were it free to
            assert transfer.sending(), "the client finished while its receiver read nothing"
            transfer.finish()  # every byte, in order: spliced first, then TCP
    finally:
        sampling.set()
    # Memory stayed under the guard's mark (64 MiB; racing verdicts may overdraw by a MiB each), far from
    # the kernel's pressure mark; other tests on the machine may add their own share.
    assert (peak[0] - before) * 4096 < 160 << 20, (before, peak[0])
    assert agent.status()["splice_guard"]["high_pages"] >= 16384
