"""Helpers shared by benchmarks: machine description, progress lines, CPU time, medians, the JSON/text report."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# Other work on the machine moves every figure: say how busy it was when the benchmark started
# (this module is imported first thing; at the end the load is mostly the benchmark's own).
LOAD_AT_START = os.getloadavg()[0]


def machine() -> dict[str, Any]:
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "load_average_1min_at_start": round(LOAD_AT_START, 2),
    }


Progress = Callable[[str], None]


def progress_printer(quiet: bool) -> Progress:
    """Progress lines to stderr; none when `quiet` (with --json, the output is the one JSON object)."""
    def progress(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)
    return progress


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, every thread."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_line(name: str, m: Mapping[str, Any]) -> str:
    return (f"{name}: {m['cpu_model']}, {m['cpus']} CPUs, kernel {m['kernel']}, Python {m['python']}, "
            f"load average {m['load_average_1min_at_start']} at start")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_ci95(values: list[float]) -> tuple[float, float]:
    """A confidence interval of at least 95% for the median, distribution-free: the k-th smallest and
    k-th largest value, k the largest rank with P(Binomial(n, 1/2) < k) <= 2.5% (n >= 6; fewer
    values give no such rank: then the whole range). Meant for a few dozen values (batch medians)."""
    if not values:
        return float("nan"), float("nan")
    s = sorted(values)
    n = len(s)
    k, below = 0, 0.0  # below = P(X < k + 1) once the loop adds P(X = k)
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > 0.025:
            break
        k += 1
    return s[max(0, k - 1)], s[min(n - 1, n - k)]


def percentile(values: list[float], q: float) -> float:
    """q in [0, 100]; nearest-rank on the sorted values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def report(
    name: str,
    baseline: Mapping[str, float],
    candidate: Mapping[str, float],
    ratio: Mapping[str, float],
    as_json: bool,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Print one JSON object (`--json`) or a readable table of baseline, candidate and ratio.
    Every benchmark reports ratio = candidate / baseline."""
    doc: dict[str, Any] = {
        "benchmark": name,
        "machine": machine(),
        "baseline": dict(baseline),
        "candidate": dict(candidate),
        "ratio": dict(ratio),
    }
    if extra:
        doc.update(extra)
    if as_json:
        print(json.dumps(doc, indent=None, sort_keys=False))
        return
    m = doc["machine"]
    print(machine_line(name, m))
    keys = list(dict.fromkeys([*baseline, *candidate]))
    width = max(len(k) for k in keys) if keys else 10
    print(f"  {'metric':<{width}}  {'baseline':>14}  {'candidate':>14}  {'ratio':>8}")
    for k in keys:
        b, c = baseline.get(k, float("nan")), candidate.get(k, float("nan"))
        r = ratio.get(k)
        rs = f"{r:8.3f}" if r is not None else " " * 8
        print(f"  {k:<{width}}  {b:14.6g}  {c:14.6g}  {rs}")
    for k, v in (extra or {}).items():
        print(f"  {k}: {v}")
