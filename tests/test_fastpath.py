"""Same-node fast path in a real lab: real programs, real sockets, bytes checked bit for bit."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from accel.lab import Lab
from sockops_bpf import loader
from sockops_bpf.maps import open_pinned
from tests import traffic

pytestmark = [pytest.mark.lab]
MiB = 1 << 20


def counters(lab: Lab) -> dict[str, int]:
    with open_pinned(loader.pin_dir(lab.instance)) as maps:
        return maps.counters()


@pytest.mark.slow
def test_200_concurrent_connections_random_sizes_up_to_4mib(make_lab: Callable[..., Any]) -> None:
    lab: Lab = make_lab(2)
    t = traffic.start(lab, "pod1", "pod2", lab.pod("pod1").ipv4, 9000, conns=200, msgs=3, max_size=4 * MiB)
    moved = traffic.finish(t, 200)
    c = counters(lab)
    assert moved > 0
    assert c["sockets_inserted"] >= 400, c  # both ends of every connection were spliced
    assert c["redirect_verdicts"] >= 200, c
    assert c["insert_errors"] == 0, c


def test_half_close_while_the_other_side_still_sends(make_lab: Callable[..., Any]) -> None:
    lab: Lab = make_lab(2)
    t = traffic.start(lab, "pod1", "pod2", lab.pod("pod1").ipv4, 9001, conns=20, msgs=5, max_size=1 * MiB,
                      half_close=True)
    traffic.finish(t, 20)
    c = counters(lab)
    assert c["sockets_inserted"] >= 40 and c["redirect_verdicts"] >= 20, c


def test_ipv6(make_lab: Callable[..., Any]) -> None:
    lab: Lab = make_lab(2)
    t = traffic.start(lab, "pod2", "pod1", lab.pod("pod2").ipv6, 9002, conns=20, msgs=4, max_size=2 * MiB)
    traffic.finish(t, 20)
    c = counters(lab)
    assert c["sockets_inserted"] >= 40 and c["redirect_verdicts"] >= 20, c


def test_loopback_inside_pods_is_spliced_per_namespace(make_lab: Callable[..., Any]) -> None:
    """Every pod has its own 127.0.0.1: the same 4-tuple in two pods must not be crossed."""
    lab: Lab = make_lab(2)
    runs = [traffic.start(lab, pod, pod, "127.0.0.1", 9003, conns=10, msgs=4, max_size=MiB, seed=i)
            for i, pod in enumerate(("pod1", "pod2"))]
    for t in runs:
        traffic.finish(t, 10)
    assert counters(lab)["sockets_inserted"] >= 40


def test_connection_opened_before_attach_keeps_working(make_lab: Callable[..., Any]) -> None:
    lab: Lab = make_lab(2, attach=False)
    t = traffic.start(lab, "pod1", "pod2", lab.pod("pod1").ipv4, 9004, conns=5, msgs=60, max_size=256 * 1024,
                      pause=0.03)
    time.sleep(0.5)  # streams are under way on the plain path
    lab.attach_bpf()
    after = traffic.start(lab, "pod1", "pod2", lab.pod("pod1").ipv4, 9005, conns=5, msgs=4, max_size=MiB)
    traffic.finish(after, 5)
    traffic.finish(t, 5)
    c = counters(lab)
    assert c["sockets_inserted"] == 10, c  # only the connections made after attaching


@pytest.mark.slow
def test_detach_and_reload_while_50_connections_stream(make_lab: Callable[..., Any]) -> None:
    lab: Lab = make_lab(2)
    # ~10 s streams: long enough to outlive two recompiles on a busy 2-core machine.
    t = traffic.start(lab, "pod1", "pod2", lab.pod("pod1").ipv4, 9006, conns=50, msgs=200, max_size=64 * 1024,
                      pause=0.05)
    time.sleep(0.5)
    assert counters(lab)["sockets_inserted"] >= 100
    loader.detach(lab.instance)  # agent stopped: no new splicing, spliced sockets keep going
    time.sleep(0.3)
    lab.attach_bpf()  # agent restarted / upgraded: recompile, swap programs, reuse the pinned maps
    with open_pinned(loader.pin_dir(lab.instance)) as maps:
        assert maps.socket_count() >= 100  # the established sockets are still in the map
    lab.attach_bpf()
    assert t.client is not None and t.client.poll() is None, "streams ended before the reloads were done"
    traffic.finish(t, 50)


def test_uninstall_while_streaming_loses_nothing(make_lab: Callable[..., Any]) -> None:
    """Removing every attachment and pin under live spliced connections: they fall back to TCP."""
    lab: Lab = make_lab(2)
    t = traffic.start(lab, "pod1", "pod2", lab.pod("pod1").ipv4, 9007, conns=20, msgs=100, max_size=64 * 1024,
                      pause=0.03)
    time.sleep(0.5)
    lab.detach_bpf()
    assert t.client is not None and t.client.poll() is None, "streams ended before the uninstall"
    assert not loader.pin_dir(lab.instance).exists()
    traffic.finish(t, 20)


def test_status_shows_attachments_maps_and_counters(make_lab: Callable[..., Any]) -> None:
    lab: Lab = make_lab(2)
    out = subprocess.run([sys.executable, "-m", "accel.cli", "status", "--instance", lab.instance],
                         capture_output=True, text=True, check=True).stdout
    assert f"cgroup_sock_ops  {lab.cgroup}" in out
    assert "sk_msg" in out
    assert "local_endpoints      entries 6/65536" in out  # 2 pods x (v4 + v6) + 127.0.0.1 + ::1
    assert "sockets_inserted" in out
