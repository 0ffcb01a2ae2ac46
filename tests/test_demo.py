"""The README's first command: `accel lab demo` runs to the end, checks every byte, shows both service
backends answering through the ClusterIP, and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from accel.lab import PREFIX
from tests.conftest import leftovers

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_lab_demo(bpf_env: None, tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "accel.cli", "lab", "demo", "--megabytes", "8",
                        "--map", str(tmp_path / "demo-map.svg")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "all bytes verified" in p.stdout
    assert "answered by pod2" in p.stdout and "answered by pod3" in p.stdout
    assert "getpeername() says 10.96.0.10" in p.stdout
    # It ends with the service map of its flows: the file it names parses, and holds the edges it printed,
    # those to the backends with as many connections as answered through the ClusterIP.
    wrote = re.search(r"wrote (\S+\.svg)\n", p.stdout)
    assert wrote and Path(wrote.group(1)) == tmp_path / "demo-map.svg", p.stdout[-2000:]
    ids = {g.get("id", "") for g in ET.parse(wrote.group(1)).iter("{http://www.w3.org/2000/svg}g")}
    edges = re.findall(r"^    (\S+) -> (\S+) \((\w+)\): (.+)$", p.stdout, re.M)
    printed = {f"edge:{a}->{b}:{kind}": label for a, b, kind, label in edges}
    assert {i for i in ids if i.startswith("edge:")} == set(printed), (ids, printed)
    assert {i for i in ids if i.startswith("node:")} == {f"node:{n}" for a, b, _, _ in edges for n in (a, b)}
    for backend in ("pod2", "pod3"):
        answered = re.search(rf"(\d+) connections from pod1 to 10.96.0.10:80 answered by {backend}", p.stdout)
        assert answered, p.stdout
        n = int(answered.group(1))
        assert printed[f"edge:lab/pod1->lab/{backend}:plaintext"].split(",")[0] == f"{n} conn{'s' if n != 1 else ''}"
    lab_id = re.search(rf"netns {PREFIX}(\w+)-pod1", p.stdout)
    assert lab_id, p.stdout
    assert leftovers(lab_id.group(1)) == []
