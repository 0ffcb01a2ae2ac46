"""The one small interface every source implements: `run(sink, stop)` until `stop` is set."""

from __future__ import annotations

import threading
from typing import Protocol

from accel.state.model import Event


class Sink(Protocol):
    """Receives what a source sees. Called from the source's threads; implementations are thread-safe."""

    def event(self, ev: Event) -> None:
        """One object added, modified or deleted (in the order the source saw them)."""

    def synced(self) -> None:
        """Every kind has been listed once: the events so far are a complete picture of the cluster."""

    def problem(self, reason: str, message: str) -> None:
        """Bad input or a transient failure: `reason` is a short metric label, `message` one log line."""

    def stat(self, name: str, kind: str) -> None:
        """Count a source occurrence (relist, reconnect, bookmark, ...) for metrics."""


class Source(Protocol):
    name: str

    def run(self, sink: Sink, stop: threading.Event) -> None:
        """Blocks, feeding `sink`, until `stop` is set. Recovers from its own failures."""
