"""An in-process Kubernetes API server for tests and benchmarks of the kube source: threaded HTTP on 127.0.0.1 with a
random port, speaking the real list/watch protocol for the kinds meshaccel reads.

Protocol: list returns a `<Kind>List` with metadata.resourceVersion; `?watch=true&resourceVersion=RV`
streams chunked JSON lines `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}` from
after RV; an RV older than the compacted history gets an ERROR event carrying a `Status` with code
410 (what the real server sends). Bookmarks only go to watches that asked (`allowWatchBookmarks`).
Discovery (`/apis/<group>/<version>`) answers 404 for CRD groups that are "not installed".

Events: POST /api/v1/namespaces/NS/events creates one (409 if the name exists), PATCH .../events/NAME
merges into it (merge patch; 404 if missing); `events` holds them, `fail_events(n)` answers the next
n Event requests 500.

Test controls: `drop_watches(partial=True)` cuts every stream mid-event, `compact()` forgets history
(so resumes get 410), `force_gone(n)`, `pause()`/`resume()` (all requests fail with 503 while the
test changes objects), `bookmark()`, and `scramble_rv` (opaque resourceVersions whose numeric order
differs from the event order, as the API allows: clients must not compare them).
"""

from __future__ import annotations

import bisect
import json
import threading
import time
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import yaml

from accel.state.parse import API_KINDS

TOKEN = "meshaccel-test-token"

# list path -> (kind, apiVersion, namespaced), from the table the real source reads too
RESOURCES: dict[str, tuple[str, str, bool]] = {a.path: (str(a.kind), a.group_version, a.namespaced)
                                               for a in API_KINDS.values()}
PATH_OF_KIND = {kind: path for path, (kind, _, _) in RESOURCES.items()}
API_VERSION_OF_KIND = {kind: av for _, (kind, av, _) in RESOURCES.items()}
CRD_GROUPS = {a.group_version for a in API_KINDS.values() if a.crd}
BUILTIN_GROUPS = {a.group_version for a in API_KINDS.values() if not a.crd and a.group}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeApiServer:
    """Holds objects per kind, a global sequence (like etcd's revision) and per-kind event history."""

    def __init__(self, *, crds: bool = True, scramble_rv: bool = False) -> None:
        self.crds = crds
        self.scramble_rv = scramble_rv
        self._cond = threading.Condition()
        self._seq = 1
        self._tokens: dict[str, int] = {}
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k, _, _ in RESOURCES.values()}
        self._history: dict[str, list[tuple[int, bytes]]] = {k: [] for k, _, _ in RESOURCES.values()}
        self._compacted = 0  # events with seq <= this are forgotten
        self._epoch = 0  # bumped by drop_watches: streams of an older epoch end
        self._bookmark_epoch = 0
        self._gone_budget = 0
        self._paused = False
        self._closing = False
        self.requests: dict[str, int] = {}  # "list Pod", "watch Pod", ... -> count
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.change_times: dict[str, float] = {}
        self._watchers: dict[str, int] = {}
        self._continues: dict[str, tuple[list[dict[str, Any]], str]] = {}  # token -> time.monotonic() of the write (bench)
        self.events: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> Event
        self._event_failures = 0

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeApiServer:
        server = self

        class Handler(_Handler):
            api = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def write_kubeconfig(self, path: Path) -> Path:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    # --- resource versions --------------------------------------------------------------------

    def _token(self, seq: int) -> str:
        # Scrambled: a bijection on 32-bit numbers, so numeric order is unrelated to event order.
        tok = str((seq * 2654435761 + 12345) % 2**32) if self.scramble_rv else str(seq)
        self._tokens[tok] = seq
        return tok

    # --- object operations (what a controller would do) ---------------------------------------

    def apply(self, obj: dict[str, Any]) -> str:
        """Create or replace an object; returns its new resourceVersion."""
        return self.apply_many([obj])[-1]

    def apply_many(self, objs: Iterable[dict[str, Any]]) -> list[str]:
        out = []
        with self._cond:
            for given in objs:
                obj = json.loads(json.dumps(given))
                kind = obj["kind"]
                meta = obj.setdefault("metadata", {})
                ns = meta.get("namespace", "default") if RESOURCES[PATH_OF_KIND[kind]][2] else ""
                if ns:
                    meta["namespace"] = ns
                key = (ns, meta["name"])
                old = self._objects[kind].get(key)
                meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
                self._seq += 1
                tok = self._token(self._seq)
                meta["resourceVersion"] = tok
                obj.setdefault("apiVersion", API_VERSION_OF_KIND[kind])
                self._objects[kind][key] = obj
                self._record(kind, "MODIFIED" if old else "ADDED", obj)
                out.append(tok)
            self._cond.notify_all()
        return out

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        with self._cond:
            obj = self._objects[kind].pop((namespace, name), None)
            if obj is None:
                return False
            self._seq += 1
            obj = json.loads(json.dumps(obj))
            obj["metadata"]["resourceVersion"] = self._token(self._seq)
            self._record(kind, "DELETED", obj)
            self._cond.notify_all()
            return True

    def _record(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        line = json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n"
        self._history[kind].append((self._seq, line))
        self.change_times[obj["metadata"]["resourceVersion"]] = time.monotonic()

    def objects(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(json.dumps(o)) for o in self._objects[kind].values()]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            o = self._objects[kind].get((namespace, name))
            return json.loads(json.dumps(o)) if o is not None else None

    # --- test controls ------------------------------------------------------------------------

    def drop_watches(self) -> None:
        """Cut every open watch stream, mid-event (half a JSON line, no terminating chunk)."""
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget all history so far: a watch resuming from any older resourceVersion gets 410."""
        with self._cond:
            self._compacted = self._seq
            for h in self._history.values():
                h.clear()

    def force_gone(self, n: int = 1) -> None:
        """The next `n` watch requests get an ERROR event with a 410 Status right away."""
        with self._cond:
            self._gone_budget += n

    def pause(self) -> None:
        """Drop all watches and answer every request 503 until resume()."""
        with self._cond:
            self._paused = True
            self._epoch += 1
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._paused = False

    def bookmark(self) -> None:
        """Every open watch that allows bookmarks sends a BOOKMARK with the current resourceVersion."""
        with self._cond:
            self._bookmark_epoch += 1
            self._cond.notify_all()

    def inject_raw(self, kind: str, line: bytes) -> None:
        """Stream `line` to the watches of `kind` as if it were an event (a broken proxy, say)."""
        with self._cond:
            self._seq += 1
            self._token(self._seq)
            self._history[kind].append((self._seq, line))
            self._cond.notify_all()

    def fail_events(self, n: int = 1) -> None:
        """The next `n` Event requests get 500."""
        with self._cond:
            self._event_failures += n

    def event_list(self) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(json.dumps(e)) for e in self.events.values()]

    def count(self, what: str) -> int:
        with self._cond:
            return self.requests.get(what, 0)

    def wait_for_watchers(self, kinds: Iterable[str], timeout: float = 10.0) -> bool:
        """True once every kind has an open watch (so events written now are streamed, not listed)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(self._watchers.get(k, 0) > 0 for k in kinds):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # --- request handling (called from handler threads) -------------------------------------

    def _count(self, what: str) -> None:
        self.requests[what] = self.requests.get(what, 0) + 1


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = orjson.dumps(body)  # the real server is Go: keep this stand-in from being the bottleneck
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        api = self.api
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._json(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        with api._cond:
            paused = api._paused
        if paused:
            self._json(503, _status(503, "ServiceUnavailable", "apiserver paused by the test"))
            return
        gv = url.path.removeprefix("/apis/")
        if gv in CRD_GROUPS or gv in BUILTIN_GROUPS:
            if gv in CRD_GROUPS and not api.crds:
                self._json(404, _status(404, "NotFound", "the server could not find the requested resource"))
                return
            resources = [{"name": p.rsplit("/", 1)[1], "kind": k, "namespaced": n, "verbs": ["list", "watch"]}
                         for p, (k, _, n) in RESOURCES.items() if p.startswith(url.path + "/")]
            self._json(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                             "resources": resources})
            return
        res = RESOURCES.get(url.path)
        if res is None or (not api.crds and any(url.path.startswith(f"/apis/{g}/") for g in CRD_GROUPS)):
            self._json(404, _status(404, "NotFound", "the server could not find the requested resource"))
            return
        kind, api_version, _ = res
        if q.get("watch") in ("true", "1"):
            self._watch(kind, q)
        else:
            self._list(kind, api_version, q)

    # --- Events (the only thing the agent writes) -------------------------------------------------

    def _event_request(self) -> tuple[str, str | None, dict[str, Any]] | None:
        """Checks shared by POST and PATCH; (namespace, name or None, body) or None when answered."""
        api = self.api
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._json(401, _status(401, "Unauthorized", "Unauthorized"))
            return None
        parts = urlsplit(self.path).path.strip("/").split("/")
        body_raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if len(parts) not in (5, 6) or parts[:3] != ["api", "v1", "namespaces"] or parts[4] != "events":
            self._json(404, _status(404, "NotFound", "the server could not find the requested resource"))
            return None
        with api._cond:
            api._count(f"{self.command} Event")
            if api._paused or api._event_failures > 0:
                api._event_failures = max(0, api._event_failures - 1)
                self._json(500 if not api._paused else 503, _status(500, "InternalError", "failing on purpose"))
                return None
        try:
            body = json.loads(body_raw or b"{}")
        except ValueError:
            self._json(400, _status(400, "BadRequest", "body is not JSON"))
            return None
        if not isinstance(body, dict):
            self._json(400, _status(400, "BadRequest", "body is not an object"))
            return None
        return parts[3], parts[5] if len(parts) == 6 else None, body

    def do_POST(self) -> None:  # noqa: N802
        req = self._event_request()
        if req is None:
            return
        ns, name, body = req
        meta = body.get("metadata") or {}
        if name is not None or not meta.get("name") or body.get("kind", "Event") != "Event" \
                or not isinstance(body.get("involvedObject"), dict):
            self._json(422, _status(422, "Invalid", "an Event needs metadata.name and involvedObject"))
            return
        with self.api._cond:
            if (ns, meta["name"]) in self.api.events:
                self._json(409, _status(409, "AlreadyExists", f'events "{meta["name"]}" already exists'))
                return
            meta["namespace"] = ns
            self.api._seq += 1
            meta["resourceVersion"] = self.api._token(self.api._seq)
            self.api.events[(ns, meta["name"])] = body
        self._json(201, body)

    def do_PATCH(self) -> None:  # noqa: N802
        req = self._event_request()
        if req is None:
            return
        ns, name, body = req
        if name is None:
            self._json(405, _status(405, "MethodNotAllowed", "PATCH needs an Event name"))
            return
        if self.headers.get("Content-Type") != "application/merge-patch+json":
            self._json(415, _status(415, "UnsupportedMediaType", "this fake takes merge patches only"))
            return
        with self.api._cond:
            event = self.api.events.get((ns, name))
            if event is None:
                self._json(404, _status(404, "NotFound", f'events "{name}" not found'))
                return
            _merge(event, body)
        self._json(200, event)

    def _list(self, kind: str, api_version: str, q: dict[str, str]) -> None:
        """A list, paged like the real server when `limit` is given: every page comes from the snapshot
        the first one was cut from (same resourceVersion), linked by an opaque `continue` token."""
        api = self.api
        limit = int(q.get("limit") or 0)
        with api._cond:
            cont = q.get("continue")
            api._count(f"list-page {kind}" if cont else f"list {kind}")  # "list": a whole list started
            if cont:
                snap = api._continues.pop(cont, None)
                if snap is None:
                    self._json(410, _status(410, "Expired", "the provided continue parameter is too old"))
                    return
                items, rv = snap
            else:
                items, rv = list(api._objects[kind].values()), api._token(api._seq)
            page, rest = (items[:limit], items[limit:]) if limit > 0 else (items, [])
            meta: dict[str, Any] = {"resourceVersion": rv}
            if rest:
                token = uuid.uuid4().hex
                api._continues[token] = (rest, rv)
                meta["continue"] = token
        out = []
        for o in page:
            item = dict(o)
            item.pop("kind", None)
            item.pop("apiVersion", None)
            out.append(item)
        self._json(200, {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta, "items": out})

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, kind: str, q: dict[str, str]) -> None:
        api = self.api
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(q.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        rv = q.get("resourceVersion", "")
        with api._cond:
            api._count(f"watch {kind}")
            epoch, bm_epoch = api._epoch, api._bookmark_epoch
            gone = False
            if api._gone_budget > 0:
                api._gone_budget -= 1
                gone = True
            if rv in ("", "0"):
                cursor = api._seq
                initial = [json.dumps({"type": "ADDED", "object": o}).encode() + b"\n"
                           for o in api._objects[kind].values()]
            else:
                initial = []
                seq = api._tokens.get(rv)
                cursor = seq if seq is not None else -1
                if seq is None or seq < api._compacted:
                    gone = True
            if gone:
                status = _status(410, "Expired", f"too old resource version: {rv} ({api._token(api._seq)})")
                self._chunk(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                self._chunk(b"")
                return
            api._watchers[kind] = api._watchers.get(kind, 0) + 1
            api._cond.notify_all()
        try:
            for line in initial:
                self._chunk(line)
            self._stream(kind, cursor, epoch, bm_epoch, bookmarks, deadline)
        except OSError:  # the client went away, or we cut the stream
            pass
        finally:
            with api._cond:
                api._watchers[kind] -= 1

    def _stream(self, kind: str, cursor: int, epoch: int, bm_epoch: int, bookmarks: bool, deadline: float) -> None:
        api = self.api
        history = api._history[kind]
        while True:
            with api._cond:
                while True:
                    if api._closing or api._epoch != epoch:
                        # Cut mid-event: half a JSON line and no terminating chunk.
                        self._chunk(b'{"type":"MODIFIED","object":{"kind":')
                        self.connection.shutdown(2)
                        return
                    i = bisect.bisect_right(history, cursor, key=lambda e: e[0])
                    if i < len(history):
                        pending = [line for _, line in history[i:]]
                        cursor = history[-1][0]
                        break
                    if api._bookmark_epoch != bm_epoch:
                        bm_epoch = api._bookmark_epoch
                        if bookmarks:
                            cursor = api._seq
                            bm = {"type": "BOOKMARK", "object": {
                                "kind": kind, "apiVersion": API_VERSION_OF_KIND[kind],
                                "metadata": {"resourceVersion": api._token(api._seq)}}}
                            pending = [json.dumps(bm).encode() + b"\n"]
                            break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._chunk(b"")  # clean end of stream at timeoutSeconds
                        return
                    api._cond.wait(min(left, 1.0))
            for line in pending:
                self._chunk(line)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 merge patch, in place."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = v
