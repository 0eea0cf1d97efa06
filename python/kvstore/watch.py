"""Watch (docs/DESIGN.md §2.17, §9.1): an iterator of a range's changes
that resumes by itself.

The stream is NDJSON, one event a line, read with a bounded line on a
connection of its own. A connection that breaks, a node that goes away,
one silent for three progress intervals, or an error event
``watcher_too_slow`` or ``shutting_down`` is left for the next endpoint,
with the client's backoff, from where the caller was: after the k-th event
of record I, ``from_index=I`` dropping the first k events of I; after
progress P, ``from_index=P+1``. So each event comes once, in order.
Failures in a row last at most ``reconnect_s``; ``compacted`` raises
:class:`~kvstore.errors.CompactedError`.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from .errors import (
    CompactedError,
    ConnectError,
    DecodeError,
    InvalidRequestError,
    KVError,
    KVTimeoutError,
    ResponseTooLargeError,
    ServerError,
    TransportError,
)

if TYPE_CHECKING:
    from .client import KVClient

__all__ = ["Watch", "Position", "Skipper", "after_event", "after_progress", "DEFAULT_MAX_EVENT_BYTES"]

#: Longest event line taken: a value and its previous value, each up to
#: kvd's 4 MiB default, base64 in the worst case, with slack for escapes.
DEFAULT_MAX_EVENT_BYTES = 16 << 20

#: Silent progress intervals after which a connection is taken for dead.
SILENT_INTERVALS = 3

#: ``X-KV-Watch-Index``: the node's applied index when the watch started.
WATCH_INDEX_HEADER = "x-kv-watch-index"

#: Where the next connection starts: ``(from_index, events of it to drop)``.
Position = tuple[int, int]


def after_event(pos: Position, index: int) -> Position:
    """The position after delivering an event of record ``index``."""
    from_index, skip = pos
    return (index, skip + 1) if index == from_index else (index, 1)


def after_progress(pos: Position, index: int) -> Position | None:
    """The position after progress ``index``, or ``None`` when the progress
    is behind what was delivered (nothing to pass on)."""
    from_index, skip = pos
    nxt = index + 1
    if nxt > from_index or (nxt == from_index and skip == 0):
        return (nxt, 0)
    return None


class Skipper:
    """The resume rule on one connection started at ``start``: the first
    ``skip`` events of record ``from_index`` were delivered before (and any
    of an earlier record, which a node never resends)."""

    def __init__(self, start: Position) -> None:
        self.start = start
        self.seen_at_start = 0

    def admit(self, index: int) -> bool:
        """Whether an event of record ``index`` is new to the caller."""
        from_index, skip = self.start
        if index < from_index:
            return False
        if index == from_index:
            self.seen_at_start += 1
            return self.seen_at_start > skip
        return True


class Watch:
    """An iterator of event dicts; see :meth:`kvstore.client.KVClient.watch`."""

    def __init__(
        self,
        client: KVClient,
        *,
        prefix: str | None,
        key: str | None,
        start: str | None,
        end: str | None,
        from_index: int | None,
        prev_value: bool,
        progress_ms: int,
        reconnect_s: float,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        from .client import validate_key

        self._client = client
        self._params = _target_params(prefix, key, start, end, validate_key)
        if prev_value:
            self._params["prev_value"] = "true"
        if isinstance(progress_ms, bool) or not isinstance(progress_ms, int) or not 100 <= progress_ms <= 60_000:
            raise InvalidRequestError(f"progress_ms must be an int within 100 ..= 60000, not {progress_ms!r}")
        self._params["progress_ms"] = str(progress_ms)
        if from_index is not None and (
            isinstance(from_index, bool) or not isinstance(from_index, int) or not 1 <= from_index <= 1 << 63
        ):
            raise InvalidRequestError(f"from_index must be an int within 1 ..= 2**63, not {from_index!r}")
        self._silence = SILENT_INTERVALS * progress_ms / 1000
        self._reconnect_s = reconnect_s
        self._max_line = max_event_bytes
        self._pos: Position | None = None if from_index is None else (from_index, 0)
        self._endpoint = client.current_endpoint
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._skipper: Skipper | None = None
        self._failures = 0
        self._failing_since: float | None = None
        self._closed = False
        self._lock = threading.Lock()

    # -- the iterator ----------------------------------------------------

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._closed:
                raise StopIteration
            try:
                if self._resp is None:
                    self._connect()
                line = self._read_line()
            except KVError as err:
                if self._closed:
                    raise StopIteration from None
                self._failed(err)
                continue
            if line is None:
                # The node ended the stream: resume as after any failure (a
                # node that keeps ending it must not be hammered).
                try:
                    self._failed(TransportError(f"{self._endpoint} ended the watch", endpoint=self._endpoint))
                except KVError:
                    if self._closed:
                        raise StopIteration from None
                    raise
                continue
            try:
                event = self._take(line)
            except _Resume as resume:
                self._failed(resume.error)
                continue
            if event is not None:
                self._failures = 0
                self._failing_since = None
                return event

    def close(self) -> None:
        """Ends the watch (from any thread): the iterator stops."""
        self._closed = True
        self._drop()

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def resume_point(self) -> Position | None:
        """Where a new connection would start, ``None`` before a watch
        without ``from_index`` has connected."""
        return self._pos

    @property
    def endpoint(self) -> str:
        """The node it reads from (or tries next)."""
        return self._endpoint

    # -- connections -----------------------------------------------------

    def _path(self) -> str:
        params = dict(self._params)
        if self._pos is not None:
            params["from_index"] = str(self._pos[0])
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
        return f"/v1/watch?{query}"

    def _connect(self) -> None:
        endpoint = self._endpoint
        parts = urlsplit(endpoint)
        client = self._client
        from .client import _Connection  # client imports this module

        tls = client._tls if parts.scheme == "https" else None
        conn = _Connection(parts.hostname or "", parts.port, client.connect_timeout, tls)
        with self._lock:
            self._conn = conn
        try:
            conn.connect()
        except OSError as err:
            conn.close()
            raise ConnectError(f"cannot connect to {endpoint}: {err}", endpoint=endpoint) from err
        assert conn.sock is not None
        conn.sock.settimeout(client.timeout)
        try:
            headers = {"Accept": "application/x-ndjson", **client._auth}
            conn.request("GET", parts.path + self._path(), headers=headers)
            resp = conn.getresponse()
        except socket.timeout as err:
            conn.close()
            raise KVTimeoutError(f"watch on {endpoint} did not answer in time", endpoint=endpoint) from err
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            raise TransportError(f"watch on {endpoint} failed: {err}", endpoint=endpoint) from err
        if not 200 <= resp.status < 300:
            from .client import Response, _server_error

            body = resp.read(64 << 10)
            headers = {k.lower(): v for k, v in resp.getheaders()}
            conn.close()
            raise _server_error(Response(endpoint, resp.status, headers, body))
        if self._pos is None:
            raw = (resp.getheader(WATCH_INDEX_HEADER) or "").strip()
            if not raw.isdigit():
                conn.close()
                raise DecodeError(f"watch answer from {endpoint} has no {WATCH_INDEX_HEADER}", endpoint=endpoint)
            self._pos = (int(raw) + 1, 0)
        conn.sock.settimeout(self._silence)
        self._resp = resp
        self._skipper = Skipper(self._pos)

    def _drop(self) -> None:
        with self._lock:
            conn, self._conn, self._resp = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def _failed(self, err: KVError) -> None:
        """Raises ``err`` if it is final or failures in a row lasted too
        long; else sleeps the backoff and moves to the next endpoint."""
        self._drop()
        if not _resumable(err):
            self._closed = True
            raise err
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since >= self._reconnect_s:
            self._closed = True
            raise err
        asked = getattr(err, "retry_after", None)
        delay = min(float(asked), 5.0) if isinstance(asked, (int, float)) else self._client._backoff(self._failures)
        self._failures += 1
        self._endpoint = self._client._endpoints.failed(self._endpoint, None)
        time.sleep(delay)

    def _read_line(self) -> bytes | None:
        """The next non-empty line, ``None`` at the end of the stream."""
        resp = self._resp
        endpoint = self._endpoint
        while resp is not None:
            try:
                line = resp.readline(self._max_line + 1)
            except socket.timeout as err:
                raise KVTimeoutError(
                    f"{endpoint} sent nothing on the watch for {self._silence:.1f} s", endpoint=endpoint
                ) from err
            except (OSError, http.client.HTTPException, ValueError) as err:
                raise TransportError(f"watch on {endpoint} broke: {err}", endpoint=endpoint) from err
            if not line:
                return None
            if len(line) > self._max_line and not line.endswith(b"\n"):
                self._closed = True
                raise ResponseTooLargeError(
                    f"a watch event from {endpoint} exceeds {self._max_line} bytes", endpoint=endpoint
                )
            line = line.strip(b"\r\n")
            if line:
                return line
        return None

    def _take(self, line: bytes) -> dict[str, Any] | None:
        """The event to pass on, or ``None`` (one already delivered, or an
        error event after which the watch resumes)."""
        endpoint = self._endpoint
        try:
            event = json.loads(line)
            kind = event["type"]
        except (ValueError, TypeError, KeyError) as err:
            self._closed = True
            raise DecodeError(f"bad watch event from {endpoint}: {err}", endpoint=endpoint) from err
        if kind == "error":
            code = str(event.get("code", ""))
            message = str(event.get("message", ""))
            if code == "compacted":
                self._closed = True
                oldest = event.get("oldest_index", event.get("resume_index", 0))
                raise CompactedError(message or "compacted", endpoint=endpoint, oldest_index=int(oldest or 0))
            if code == "watcher_too_slow":
                # Resume from our own position (it is exact), at once: the
                # node is well, the reader was slow.
                self._drop()
                return None
            if code == "shutting_down":
                # The node is going: elsewhere, after the backoff.
                raise _Resume(ServerError(message or code, endpoint=endpoint, status=503, code=code))
            self._closed = True
            raise ServerError(message or code, endpoint=endpoint, status=200, code=code)
        index = event.get("index")
        if not isinstance(index, int) or self._pos is None:
            self._closed = True
            raise DecodeError(f"a watch event from {endpoint} without an index", endpoint=endpoint)
        if kind == "progress":
            nxt = after_progress(self._pos, index)
            if nxt is None:
                return None
            self._pos = nxt
            return dict(event)
        if self._skipper is None or not self._skipper.admit(index):
            return None
        self._pos = after_event(self._pos, index)
        return dict(event)


class _Resume(Exception):
    """An error event after which the watch resumes elsewhere."""

    def __init__(self, error: KVError) -> None:
        super().__init__(str(error))
        self.error = error


def _target_params(
    prefix: str | None, key: str | None, start: str | None, end: str | None, validate: Any
) -> dict[str, str]:
    """The watch's target as query parameters, checked as the node does
    (400 ``invalid_watch``)."""
    if key is not None:
        if prefix is not None or start is not None or end is not None:
            raise InvalidRequestError("a watch takes key, prefix or start/end, one of them")
        validate(key)
        return {"key": key}
    if prefix is not None and (start is not None or end is not None):
        raise InvalidRequestError("a watch takes prefix or start/end, not both")
    for bound in (prefix, start, end):
        if bound is not None and len(bound.encode("utf-8")) > 1024:
            raise InvalidRequestError("a watch bound is over 1024 bytes")
    if start is not None and end is not None and start.encode() > end.encode():
        raise InvalidRequestError(f"watch start {start!r} is after its end {end!r}")
    params = {"prefix": prefix} if prefix is not None else {}
    if start is not None:
        params["start"] = start
    if end is not None:
        params["end"] = end
    return params


def _resumable(err: KVError) -> bool:
    """Whether the watch goes on after ``err``: what a connection, a node or
    an index not applied there yet explains; not a refused request."""
    if isinstance(err, CompactedError):
        return False
    if isinstance(err, ServerError):
        return err.retryable or err.code in ("future_index", "too_many_watchers")
    return err.retryable
