"""Bad input and missing prerequisites: a one-line error that says what to do, a non-zero exit code,
and nothing left half-built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from accel.errors import UserError
from accel.lab import PREFIX, Lab
from sockops_bpf.errors import BpfError
from sockops_bpf.headers import find_kernel_headers
from sockops_bpf.loader import pin_root
from tests.conftest import leftovers, require

ACCEL = [sys.executable, "-m", "accel.cli"]


def accel(*args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), *ACCEL, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def one_line_error(p: subprocess.CompletedProcess[str], *words: str) -> str:
    assert p.returncode != 0, p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("accel: error:")]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def lab_netns() -> set[str]:
    d = Path("/run/netns")
    return {p.name for p in d.iterdir() if p.name.startswith(PREFIX)} if d.is_dir() else set()


@pytest.mark.unit
def test_lab_up_zero_pods() -> None:
    before = lab_netns()
    one_line_error(accel("lab", "up", "--pods", "0"), "--pods must be at least 1")
    assert lab_netns() == before
    with pytest.raises(UserError):
        Lab(0)


@pytest.mark.unit
def test_lab_demo_map_of_an_unknown_format() -> None:
    before = lab_netns()
    one_line_error(accel("lab", "demo", "--map", "map.jpg"), "--map map.jpg", ".svg or .png")
    assert lab_netns() == before


@pytest.mark.lab
def test_unknown_pod_name(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab(2, attach=False)
    err = one_line_error(accel("lab", "exec", "--id", lab.id, "pod9", "--", "true"), "pod9", "pod1, pod2")
    assert "no pod" in err


@pytest.mark.lab
def test_cgroup_that_does_not_exist(bpf_env: None) -> None:
    one_line_error(accel("load", "--instance", "test-badcg", "--cgroup", "/sys/fs/cgroup/nope-meshaccel"),
                   "does not exist")
    assert not (pin_root() / "test-badcg").exists()


@pytest.mark.lab
def test_no_root(bpf_env: None) -> None:
    """An unprivileged user namespace: euid is not 0 there, so the lab and the loader refuse early."""
    require(subprocess.run(["unshare", "-U", "true"]).returncode == 0, "unprivileged user namespaces unavailable")
    before = lab_netns()
    one_line_error(accel("lab", "up", "--pods", "2", prefix=["unshare", "-U"]), "needs root")
    one_line_error(accel("load", "--instance", "test-noroot", prefix=["unshare", "-U"]), "root")
    assert lab_netns() == before
    assert not (pin_root() / "test-noroot").exists()


@pytest.mark.unit
def test_no_headers_names_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "modules").mkdir()
    (tmp_path / "src").mkdir()
    env_backup = os.environ.pop("BCC_KERNEL_SOURCE", None)
    try:
        with pytest.raises(BpfError, match="linux-headers-amd64"):
            find_kernel_headers(tmp_path / "modules", tmp_path / "src")
    finally:
        if env_backup is not None:
            os.environ["BCC_KERNEL_SOURCE"] = env_backup


@pytest.mark.lab
def test_no_headers_leaves_nothing_half_built(bpf_env: None) -> None:
    p = accel("lab", "up", "--pods", "2", "--id", "nohdr", env={"BCC_KERNEL_SOURCE": "/nonexistent"})
    one_line_error(p, "BCC_KERNEL_SOURCE=/nonexistent", "kernel header tree")
    assert leftovers("nohdr") == []
