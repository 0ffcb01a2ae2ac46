"""Same-node fast path in a real lab: real programs, real sockets, bytes checked bit for bit."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from accel.lab import Lab
from sockops_bpf import libbpf, loader
from sockops_bpf.layout import MAPS, pin_name
from sockops_bpf.maps import open_pinned
from tests import traffic
from tests.waiting import wait_until

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
    assert c["proxy_bulk_to_tcp"] == 0, c  # pod to pod is no proxy leg: its 4 MiB messages stay spliced


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
    wait_until(lambda: traffic.established(lab, "pod1", 9004) == 5,
               what="the 5 plain connections established")  # under way on the plain path
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
    wait_until(lambda: counters(lab)["sockets_inserted"] >= 100, what="both ends of the 50 connections spliced")
    loader.detach(lab.instance)  # agent stopped: no new splicing, spliced sockets keep going
    time.sleep(0.3)  # deliberate: the streams run on for a while with no programs attached
    lab.attach_bpf()  # agent restarted / upgraded: recompile, swap programs, reuse the pinned maps
    with open_pinned(loader.pin_dir(lab.instance)) as maps:
        assert maps.socket_count() >= 100  # the established sockets are still in the map
    lab.attach_bpf()
    assert t.client is not None and t.client.poll() is None, "streams ended before the reloads were done"
    traffic.finish(t, 50)


def test_uninstall_keeps_live_spliced_connections_until_they_close(make_lab: Callable[..., Any]) -> None:
    """Unpinning under live spliced sockets would drop their queued bytes: uninstall stops new
    splicing at once, keeps the maps while connections remain, and finishes once they are closed."""
    lab: Lab = make_lab(2)
    t = traffic.start(lab, "pod1", "pod2", lab.pod("pod1").ipv4, 9007, conns=20, msgs=100, max_size=64 * 1024,
                      pause=0.03)
    wait_until(lambda: counters(lab)["sockets_inserted"] >= 40, what="both ends of the 20 connections spliced")
    left = loader.uninstall(lab.instance, drain_seconds=0.2)
    assert left >= 40
    assert not (loader.pin_dir(lab.instance) / "link_sockops").exists()  # detached: no new splicing
    assert (loader.pin_dir(lab.instance) / "sock_hash").exists()
    assert t.client is not None and t.client.poll() is None, "streams ended before the uninstall"
    traffic.finish(t, 20)
    assert loader.uninstall(lab.instance, drain_seconds=5) == 0
    assert not loader.pin_dir(lab.instance).exists()


def test_unmanaged_peer_falls_back_to_tcp(make_lab: Callable[..., Any]) -> None:
    """The server runs in pod1's network namespace but outside any cgroup we attach to, so only the
    client side is spliced: its sends find no peer, fall back to TCP and stay there."""
    lab: Lab = make_lab(2, attach=False)
    lab.attach_bpf({"REDIRECT_APPLY_BYTES": "4096"})  # re-run verdicts often: stickiness is exercised
    t = traffic.start(lab, "pod1", "pod2", lab.pod("pod1").ipv4, 9008, conns=10, msgs=20, max_size=256 * 1024,
                      server_in_pod_cgroup=False)
    traffic.finish(t, 10)
    c = counters(lab)
    assert c["sockets_inserted"] == 10, c  # client sides only
    assert c["fallbacks"] == 10, c  # one miss per socket, then tcp_only
    assert c["redirect_verdicts"] == 0, c


def test_kernel_map_sizes_match_the_python_mirror(make_lab: Callable[..., Any]) -> None:
    lab: Lab = make_lab(1)
    for name, (key_type, value_type) in MAPS.items():
        fd = libbpf.obj_get(str(loader.pin_dir(lab.instance) / pin_name(name)))
        try:
            info = libbpf.map_info(fd)
        finally:
            os.close(fd)
        assert (info.key_size, info.value_size) == (ctypes.sizeof(key_type), ctypes.sizeof(value_type)), name


def test_status_shows_attachments_maps_and_counters(make_lab: Callable[..., Any]) -> None:
    lab: Lab = make_lab(2)
    out = subprocess.run([sys.executable, "-m", "accel.cli", "status", "--instance", lab.instance],
                         capture_output=True, text=True, check=True).stdout
    assert f"cgroup_sock_ops  {lab.cgroup}" in out
    assert "sk_msg" in out
    assert "local_endpoints      entries 6/65536" in out  # 2 pods x (v4 + v6) + 127.0.0.1 + ::1
    assert "sockets_inserted" in out
