"""An upgrade that changes a pinned map's layout does not break the node: the previous version's
programs run with traffic flowing, the current ones load over the same pins, entries move to the new
layout, spliced connections carry on, and what the moved entries decide still holds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from accel.lab import Lab
from accel.servicelb import netns_cookie
from sockops_bpf import layout, libbpf, loader
from sockops_bpf.maps import open_mesh, open_policy
from tests import traffic
from tests.conftest import require
from tests.mesh_helpers import ECHO_SERVER, ask

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
# The last commit whose programs pin local_pods in layout 1 (identity, flags): the "running version".
PREVIOUS = "c18850b"


def previous_sources(into: Path) -> Path:
    require(shutil.which("git") is not None and (ROOT / ".git").exists(), "needs the git history of the checkout")
    into.mkdir()
    for name in ("maps.h", *loader.SOURCES):
        out = subprocess.run(["git", "-C", str(ROOT), "show", f"{PREVIOUS}:sockops_bpf/{name}"], capture_output=True)
        if out.returncode == 0:
            (into / name).write_bytes(out.stdout)
    require((into / "maps.h").exists(), f"commit {PREVIOUS} is not in this checkout's history")
    return into


def write_raw(pin: Path, entries: list[tuple[Any, Any]]) -> None:
    """Entries written straight into a pinned map (the previous layout has no view of its own here)."""
    fd = libbpf.obj_get(str(pin))
    try:
        for k, v in entries:
            libbpf.map_update(fd, k, v)
    finally:
        os.close(fd)


def test_upgrade_moves_local_pods_to_layout_2_with_traffic_flowing(make_lab: Callable[..., Any],
                                                                     tmp_path: Path) -> None:
    old = previous_sources(tmp_path / "previous")
    lab: Lab = make_lab(3, attach=False)
    lab.attach_bpf(src_dir=old)
    pdir = loader.pin_dir(lab.instance)
    assert (pdir / "local_pods").exists() and not (pdir / "local_pods_v2").exists()
    ids = {name: 5000 + i for i, name in enumerate(lab.pods)}
    write_raw(pdir / "local_pods", [(layout.LocalPodKey(netns_cookie(f"/run/netns/{p.netns}")),
                                     layout.LocalPodV1(ids[name], 0)) for name, p in lab.pods.items()])
    write_raw(pdir / "ipcache", [(layout.IpcacheKey(128, layout.IpAddr.from_ip(p.ipv4)),
                                  layout.IpcacheEntry(ids[name], layout.IPC_F_LOCAL)) for name, p in lab.pods.items()])
    with open_policy(pdir) as pm:  # pod3 admits nobody from pod1: decided by pod1's identity in local_pods
        pm.policy[(ids["pod3"], ids["pod1"], layout.POL_INGRESS, 6, 0, 0)] = (layout.POL_DENY, 99)
    server = lab.popen("pod3", [sys.executable, "-c", ECHO_SERVER, "8080"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        assert ask(lab, "pod1", lab.pod("pod3").ipv4, 8080) == "ERR PermissionError"
        assert ask(lab, "pod2", lab.pod("pod3").ipv4, 8080).startswith("echo hello")
        flowing = traffic.start(lab, "pod2", "pod1", lab.pod("pod2").ipv4, 7900, conns=8, msgs=40,
                                max_size=256 << 10, pause=0.05)
        lab.attach_bpf()  # the upgrade: the current sources over the same pins
        assert not (pdir / "local_pods").exists() and (pdir / "local_pods_v2").exists()
        with open_mesh(pdir) as mesh:
            assert {info.identity for info in mesh.local_pods.values()} == set(ids.values())
        assert ask(lab, "pod1", lab.pod("pod3").ipv4, 8080) == "ERR PermissionError"  # moved entries decide
        assert ask(lab, "pod2", lab.pod("pod3").ipv4, 8080).startswith("echo hello")
        traffic.finish(flowing, 8)  # spliced before, during and after: every byte, both ways
        st = loader.layouts(lab.instance)
        assert st["local_pods"] == {"version": 2, "pinned": True, "older_pinned": []}
        out = subprocess.run([sys.executable, "-m", "accel.cli", "status", "--instance", lab.instance],
                             capture_output=True, text=True, check=True).stdout
        line = next(ln for ln in out.splitlines() if " local_pods " in ln)
        assert "layout 2" in line and "older" not in line, line
    finally:
        server.kill()
        server.wait()
