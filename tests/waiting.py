"""Polling helpers shared by the tests: wait for a condition the system reaches asynchronously.
Every test waits through these two (never `time.sleep()` and then assert)."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(cond: Callable[[], bool], timeout: float = 15.0, interval: float = 0.02) -> bool:
    """True as soon as `cond()` is; after `timeout` seconds, whatever it says last. Between checks it
    sleeps `interval`, or as long as the check itself took if longer, so a costly check (a process
    in a pod, a query to Envoy) never runs back to back on this small shared machine."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        if cond():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(max(interval, now - started), deadline - now))


def wait_until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition",
               interval: float = 0.05) -> None:
    """Return once `cond()` holds; fail the test naming `what` after `timeout` seconds."""
    if not eventually(cond, timeout, interval):
        raise AssertionError(f"timed out waiting for {what}")
