"""Shared fixtures. BPF tests skip with a reason where BPF cannot run, and fail instead when
MESHACCEL_REQUIRE_BPF=1 (CI), so they can never pass by skipping."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def require(condition: bool, reason: str) -> None:
    """Skip (or, in CI, fail) a test whose environment lacks something it needs."""
    if condition:
        return
    if os.environ.get("MESHACCEL_REQUIRE_BPF") == "1":
        pytest.fail(f"MESHACCEL_REQUIRE_BPF=1 but: {reason}", pytrace=False)
    pytest.skip(reason)


def require_lab_with_envoy() -> None:
    """Root for a lab and a runnable Envoy, or skip (fail in CI) with the reason: for module-scoped labs,
    which cannot take the `bpf_env` fixture."""
    require(os.geteuid() == 0, "needs root for eBPF, cgroups and network namespaces")
    from accel.envoy import envoy_binary

    try:
        envoy_binary()
    except Exception as e:  # noqa: BLE001 - any reason Envoy is missing skips (or fails in CI)
        require(False, str(e))


@pytest.fixture
def bpf_env() -> None:
    """Root, bcc and usable kernel headers, or skip/fail with the reason."""
    require(os.geteuid() == 0, "needs root for eBPF, cgroups and network namespaces")
    try:
        import bcc  # noqa: F401
    except ImportError:
        require(False, "bcc (Debian python3-bpfcc) is not importable; run scripts/setup.sh")
    from sockops_bpf.errors import BpfError
    from sockops_bpf.headers import find_kernel_headers

    try:
        find_kernel_headers()
    except BpfError as e:
        require(False, str(e))


def leftovers(lab_id: str) -> list[str]:
    """Anything of one lab still on this machine."""
    from accel.lab import PREFIX, STATE_DIR
    from sockops_bpf import loader
    from sockops_bpf.cgroup import cgroup2_root

    left = [f"netns {p.name}" for p in Path("/run/netns").glob(f"{PREFIX}{lab_id}-*")]
    if (cgroup2_root() / f"{PREFIX}lab-{lab_id}").exists():
        left.append("cgroup")
    if loader.pin_dir(f"lab-{lab_id}").exists():
        left.append("pins")
    if (STATE_DIR / f"{lab_id}.json").exists():
        left.append("state file")
    return left


@pytest.fixture
def make_lab(bpf_env: None) -> Iterator[Callable[..., object]]:
    """Build labs for a test; after it, every lab is down and nothing of it is left."""
    from accel.lab import Lab

    labs: list[Lab] = []

    def make(pods: int = 2, **kw: object) -> Lab:
        lab = Lab(pods, **kw)  # type: ignore[arg-type]
        labs.append(lab)
        return lab.up()

    yield make
    for lab in labs:
        lab.down()
        assert leftovers(lab.id) == [], f"lab {lab.id} left {leftovers(lab.id)}"
