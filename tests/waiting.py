"""Polling helpers shared by the tests: wait for a condition the system reaches asynchronously."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(cond: Callable[[], bool], timeout: float = 15.0, interval: float = 0.02) -> bool:
    """True as soon as `cond()` is; after `timeout` seconds, whatever it says last."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def wait_until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition",
               interval: float = 0.05) -> None:
    """Return once `cond()` holds; fail the test naming `what` after `timeout` seconds."""
    if not eventually(cond, timeout, interval):
        raise AssertionError(f"timed out waiting for {what}")
