"""A folder of multi-document Kubernetes YAML (or JSON) as a cluster: standalone mode and the lab.

Polls file mtimes and sizes (cheap for the tens of files a folder holds). A file that does not parse
is reported with its name and the reason and its last good objects stay in effect; the other files
still apply. A document that is not a Kubernetes object is reported and skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from accel.sources.base import Sink
from accel.state.model import Event, EventType, ObjectKey, Record
from accel.state.parse import CLUSTER_SCOPED, NotOurKind, ParseError, kind_of, parse_object

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")


class ManifestSource:
    name = "manifests"

    def __init__(self, folder: Path, *, poll_interval: float = 0.5) -> None:
        self.folder = folder
        self.poll_interval = poll_interval
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._objects: dict[Path, dict[ObjectKey, Record]] = {}
        self._owner: dict[ObjectKey, Path] = {}

    def run(self, sink: Sink, stop: threading.Event) -> None:
        if not self.folder.is_dir():
            sink.problem("manifest_folder_missing", f"folder={self.folder} does not exist; waiting for it")
        first = True
        while not stop.is_set():
            try:
                self.scan(sink)
            except OSError as e:
                sink.problem("manifest_folder_unreadable", f"folder={self.folder} error={e!r}")
            except Exception as e:  # e.g. YAML nested too deep: report, keep polling, keep what we have
                log.exception("event=manifest_scan_failed folder=%s", self.folder)
                sink.problem("manifest_invalid", f"folder={self.folder} error={e!r}")
            if first:
                sink.synced()
                first = False
            stop.wait(self.poll_interval)

    def scan(self, sink: Sink) -> None:
        """One pass: apply every added, changed or removed file."""
        seen: set[Path] = set()
        for path in sorted(self._files()):
            seen.add(path)
            try:
                st = path.stat()
            except OSError:
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            if self._stamps.get(path) == stamp:
                continue
            self._stamps[path] = stamp
            self._load(path, sink)
        for path in sorted(set(self._stamps) - seen):
            del self._stamps[path]
            self._replace(path, {}, sink)
            self._objects.pop(path, None)
            log.info("event=manifest_removed file=%s", path)

    def _files(self) -> Iterator[Path]:
        if not self.folder.is_dir():
            return
        for p in self.folder.rglob("*"):
            if p.suffix in SUFFIXES and p.is_file() and not p.name.startswith("."):
                yield p

    def _load(self, path: Path, sink: Sink) -> None:
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            reason = str(e).replace("\n", " ")
            sink.problem("manifest_invalid", f"file={path} error={reason!r} (its previous objects stay in effect)")
            return
        previous = self._objects.get(path, {})
        found: dict[ObjectKey, Record] = {}
        for i, doc in enumerate(_expand(docs)):
            if doc is None:
                continue
            try:
                rec = parse_object(doc)
            except NotOurKind as e:
                log.debug("event=manifest_skip file=%s document=%d kind=%r", path, i, str(e))
                continue
            except ParseError as e:
                sink.problem("manifest_not_kubernetes", f"file={path} document={i} error={str(e)!r}")
                # Keep what this file said before about the object, if we can tell which it was.
                key = _key_hint(doc)
                if key is not None and key in previous:
                    found[key] = previous[key]
                continue
            owner = self._owner.get(rec.key)
            if owner is not None and owner != path:
                sink.problem("manifest_duplicate", f"file={path} object={rec.key} already defined in file={owner}; ignored")
                continue
            found[rec.key] = rec
        self._replace(path, found, sink)
        log.info("event=manifest_loaded file=%s objects=%d", path, len(found))

    def _replace(self, path: Path, found: dict[ObjectKey, Record], sink: Sink) -> None:
        previous = self._objects.get(path, {})
        for key, rec in found.items():
            old = previous.get(key)
            if old != rec:
                sink.event(Event(EventType.ADDED if old is None else EventType.MODIFIED, rec))
            self._owner[key] = path
        for key, old in previous.items():
            if key not in found:
                sink.event(Event(EventType.DELETED, old))
                if self._owner.get(key) == path:
                    del self._owner[key]
        self._objects[path] = found


def _expand(docs: list[Any]) -> Iterator[Any]:
    """Documents, with `kind: List` unpacked into its items."""
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            yield from d["items"]
        else:
            yield d


def _key_hint(doc: Any) -> ObjectKey | None:
    try:
        kind = kind_of(doc)
        meta = doc.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str):
            return None
        ns = "" if kind in CLUSTER_SCOPED else str(meta.get("namespace") or "default")
        return ObjectKey(kind, ns, name)
    except (ParseError, NotOurKind, AttributeError):
        return None
