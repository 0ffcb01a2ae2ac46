"""The README's first command: `accel lab demo` runs to the end, checks every byte, shows both service
backends answering through the ClusterIP, and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from accel.lab import PREFIX
from tests.conftest import leftovers

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_lab_demo(bpf_env: None) -> None:
    p = subprocess.run([sys.executable, "-m", "accel.cli", "lab", "demo", "--megabytes", "8"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "all bytes verified" in p.stdout
    assert "answered by pod2" in p.stdout and "answered by pod3" in p.stdout
    assert "getpeername() says 10.96.0.10" in p.stdout
    lab_id = re.search(rf"netns {PREFIX}(\w+)-pod1", p.stdout)
    assert lab_id, p.stdout
    assert leftovers(lab_id.group(1)) == []
