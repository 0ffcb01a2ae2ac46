"""Run a function inside another network namespace without moving this process: a short-lived thread
enters it (setns applies to the calling thread only) and its result or exception comes back."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def run_in(netns_path: str, fn: Callable[[], T]) -> T:
    """`fn()` called in a thread that entered the network namespace at `netns_path` (e.g. /proc/PID/ns/net)."""
    result: list[T] = []
    error: list[BaseException] = []

    def inside() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns_path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    t = threading.Thread(target=inside, name="in-netns")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
