"""``KVClient``: the Python client of kvstore.

It speaks kvd's HTTP API (docs/DESIGN.md §2) over keep-alive connections from the
standard library's ``http.client`` and follows the same contract as the Rust
client (``kvclient/src/client.rs``):

- every call is bounded in time: each attempt by ``timeout``, the whole call
  (attempts, backoff sleeps, redirects) by ``retry_deadline``;
- a 307/308 from a secondary moves the client to the primary it names
  (``X-KV-Primary``, else ``Location``) without spending a retry, and the
  client keeps using that primary until it fails;
- connection failures, timeouts and "not now" statuses (429/502/503/504) are
  retried with capped, jittered exponential backoff on the next endpoint,
  honouring ``Retry-After`` (or kvd's ``X-KV-Retry-After-Ms``); every other
  error is raised at once;
- a refusal that wrote nothing and says when to come back (writes paused for
  a mode switch or handover, no primary yet, overload) is retried until the
  deadline without counting against ``max_retries`` (unless it is 0);
- when the budget runs out the last error is raised, so its ``retryable``
  still tells what kind of failure it was.

Retrying writes is sound because every call is idempotent: a PUT, DELETE or
bulk write repeated with the same content leaves the same state.

Values: ``bytes`` are stored raw, every other value as JSON text; ``get``
returns the decoded JSON value, or ``bytes`` for values that are not JSON.
See :mod:`kvstore.codec` for the exact rule.

A client is thread-safe: threads share its connection pool and its knowledge
of the primary.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

from .codec import Value, decode_value, encode_value
from .errors import (
    RETRYABLE_STATUSES,
    ConfigError,
    ConnectError,
    DecodeError,
    InvalidEndpointError,
    InvalidKeyError,
    KVError,
    KVTimeoutError,
    NoPrimaryError,
    RedirectLoopError,
    ResponseTooLargeError,
    ServerError,
    TransportError,
    UnavailableError,
)

__all__ = [
    "KVClient",
    "SearchHit",
    "BulkResult",
    "Response",
    "DEFAULT_ENDPOINT",
    "MAX_KEY_BYTES",
    "validate_key",
    "key_path",
    "normalize_endpoint",
]

#: Where a kvd listens by default (docs/DESIGN.md §2).
DEFAULT_ENDPOINT = "http://127.0.0.1:8765"

#: Longest key the server accepts, in bytes of UTF-8.
MAX_KEY_BYTES = 1024

#: Header with which a secondary names the primary's base URL (docs/DESIGN.md §4).
PRIMARY_HEADER = "X-KV-Primary"

#: kvd's finer hint beside ``Retry-After``, in milliseconds.
RETRY_AFTER_MS_HEADER = "X-KV-Retry-After-Ms"

#: Error code of the server's 404 for an absent key (an unknown route gets
#: ``not_found``, which is an error, not "absent").
KEY_NOT_FOUND = "key_not_found"

#: Shortest time worth starting another attempt with.
_MIN_USEFUL_ATTEMPT = 0.02

#: Longest server error message kept (errors are printed on one line).
_MAX_ERROR_MESSAGE_CHARS = 300

#: Bytes that stay literal in a key path: RFC 3986 unreserved, plus "/".
_SAFE_IN_PATH = "/-._~"

_USER_AGENT = "kvstore-python/0.1.0"

@dataclass(frozen=True)
class SearchHit:
    """One result of ``search`` or ``search_similar``, best first."""

    key: str
    #: BM25 score (search) or cosine similarity (similar).
    score: float


@dataclass(frozen=True)
class BulkResult:
    """Answer to ``bulk_set``."""

    #: Log index of the single record holding the whole batch.
    index: int
    #: Number of items written.
    count: int


@dataclass(frozen=True)
class Response:
    """A complete HTTP answer from :meth:`KVClient.request`. Never a redirect
    or a retryable status: those are handled by the client."""

    #: Base URL of the node that answered.
    endpoint: str
    status: int
    #: Header names lower-cased.
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def raise_for_status(self) -> Response:
        """``self`` for 2xx, else the server's error as a :class:`ServerError`."""
        if 200 <= self.status < 300:
            return self
        raise _server_error(self)


def validate_key(key: str) -> None:
    """Raises :class:`InvalidKeyError` unless the server would accept ``key``
    (docs/DESIGN.md §2: UTF-8, 1..=1024 bytes, no NUL), so a bad key fails before any
    network traffic."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"key must be a str, not {type(key).__name__}")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidKeyError(f"key {_preview(key)} is not valid UTF-8: {err.reason}") from err
    if not encoded:
        raise InvalidKeyError("key is empty")
    if len(encoded) > MAX_KEY_BYTES:
        raise InvalidKeyError(
            f"key {_preview(key)} is {len(encoded)} bytes, the limit is {MAX_KEY_BYTES} bytes"
        )
    nul = encoded.find(b"\0")
    if nul >= 0:
        raise InvalidKeyError(f"key {_preview(key)} contains a NUL byte at byte {nul}")


def key_path(key: str) -> str:
    """Validates ``key`` and returns its request path ``/v1/kv/{encoded}``.

    Every byte but the unreserved set and ``/`` is percent-encoded; ``/``
    stays readable unless the key has a ``.`` or ``..`` segment, which HTTP
    stacks normalise away, so then ``/`` is encoded too (the same mapping as
    the Rust client). The keys ``.`` and ``..`` themselves cannot be addressed
    in a URL; write them with ``bulk_set``.
    """
    validate_key(key)
    if key in (".", ".."):
        raise InvalidKeyError(
            f"key {key!r} cannot be sent in a URL path (HTTP stacks remove dot segments); "
            "write it with bulk_set"
        )
    has_dot_segment = any(seg in (".", "..") for seg in key.split("/"))
    safe = "-._~" if has_dot_segment else _SAFE_IN_PATH
    return "/v1/kv/" + quote(key, safe=safe, encoding="utf-8", errors="strict")


def normalize_endpoint(raw: str) -> str:
    """A base URL in canonical form: ``http://host:port[/prefix]``, scheme
    added when missing, no trailing slash."""
    trimmed = raw.strip()
    if not trimmed:
        raise InvalidEndpointError(f"invalid endpoint {raw!r}: empty")
    with_scheme = trimmed if "://" in trimmed else f"http://{trimmed}"
    try:
        parts = urlsplit(with_scheme)
        port = parts.port
    except ValueError as err:
        raise InvalidEndpointError(f"invalid endpoint {raw!r}: {err}") from err
    if parts.scheme.lower() != "http":
        raise InvalidEndpointError(
            f"invalid endpoint {raw!r}: only http:// endpoints are supported"
        )
    if not parts.hostname:
        raise InvalidEndpointError(f"invalid endpoint {raw!r}: no host")
    if parts.query or parts.fragment:
        raise InvalidEndpointError(
            f"invalid endpoint {raw!r}: a base URL cannot have a query or fragment"
        )
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"http://{netloc}{parts.path.rstrip('/')}"


class _Connection(http.client.HTTPConnection):
    """An HTTP/1.1 keep-alive connection whose connect has its own timeout."""

    def __init__(self, host: str, port: int | None, connect_timeout: float) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self.connect_timeout = connect_timeout

    def connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), self.connect_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Pool:
    """Idle keep-alive connections per endpoint, shared by threads."""

    def __init__(self, connect_timeout: float, max_idle_per_endpoint: int) -> None:
        self._lock = threading.Lock()
        self._idle: dict[str, list[_Connection]] = {}
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_endpoint
        self._closed = False

    def take(self, endpoint: str) -> tuple[_Connection, bool]:
        """A connection to ``endpoint`` and whether it was reused."""
        with self._lock:
            idle = self._idle.get(endpoint)
            if idle:
                return idle.pop(), True
        parts = urlsplit(endpoint)
        host = parts.hostname or ""
        return _Connection(host, parts.port, self._connect_timeout), False

    def give_back(self, endpoint: str, conn: _Connection) -> None:
        with self._lock:
            if not self._closed:
                idle = self._idle.setdefault(endpoint, [])
                if len(idle) < self._max_idle:
                    idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class _Endpoints:
    """Which node to ask next: the primary learned from a redirect, else the
    current configured endpoint; shared by threads."""

    def __init__(self, configured: list[str]) -> None:
        self.configured = configured  # invariant: non-empty
        self._lock = threading.Lock()
        self._next = 0
        self._primary: str | None = None

    def current(self) -> str:
        with self._lock:
            return self._pick()

    def _pick(self) -> str:
        if self._primary is not None:
            return self._primary
        return self.configured[self._next % len(self.configured)]

    def follow(self, primary: str) -> None:
        with self._lock:
            self._primary = primary

    def failed(self, endpoint: str, hint: str | None) -> str:
        """Records that ``endpoint`` failed; returns the next node to try: the
        primary the failing node named, if any, else the next configured one."""
        with self._lock:
            if self._primary == endpoint:
                self._primary = None
            # Only advance when the failed node is the current one: another
            # thread may already have moved on.
            if self.configured[self._next] == endpoint:
                self._next = (self._next + 1) % len(self.configured)
            if hint is not None and hint != endpoint:
                self._primary = hint
            return self._pick()


class KVClient:
    """A kvstore client over one or more nodes.

    ``url_or_urls`` is a base URL (``"http://127.0.0.1:8765"``; ``http://``
    may be omitted), a comma-separated list of them (like ``KV_ENDPOINTS``),
    or a sequence; without one, ``$KV_ENDPOINTS`` (as for the ``kvclient``
    CLI), else ``http://127.0.0.1:8765``. The first is tried first. Use it as
    a context manager, or call :meth:`close`, to close its connections.

    Limits (seconds):

    - ``timeout``: one attempt, per socket operation (sending, each read);
    - ``connect_timeout``: establishing a TCP connection;
    - ``retry_deadline``: a whole call, retries and redirects included
      (15 s, enough to ride out a failover);
    - ``max_retries``: retries after the first attempt (0 disables);
    - ``backoff_initial`` / ``backoff_max``: the delay before retry *n* is
      drawn from ``[c/2, c]`` with ``c = min(backoff_max, backoff_initial *
      2**n)``;
    - ``max_redirects``: redirects in a row before
      :class:`~kvstore.errors.RedirectLoopError`;
    - ``max_retry_after``: cap on a server's ``Retry-After``;
    - ``max_response_bytes``: largest response body accepted.
    """

    def __init__(
        self,
        url_or_urls: str | Sequence[str] | None = None,
        timeout: float = 5.0,
        *,
        connect_timeout: float = 1.0,
        max_retries: int = 8,
        retry_deadline: float = 15.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 1.0,
        max_redirects: int = 5,
        max_retry_after: float = 5.0,
        max_response_bytes: int = 64 << 20,
        max_idle_connections: int = 16,
    ) -> None:
        if url_or_urls is None:
            url_or_urls = os.environ.get("KV_ENDPOINTS") or DEFAULT_ENDPOINT
        raw = url_or_urls.split(",") if isinstance(url_or_urls, str) else list(url_or_urls)
        configured: list[str] = []
        for item in raw:
            if isinstance(url_or_urls, str) and not item.strip():
                continue  # "a,,b" or a trailing comma in KV_ENDPOINTS
            url = normalize_endpoint(item)
            if url not in configured:  # duplicates would skew rotation
                configured.append(url)
        if not configured:
            raise ConfigError("no endpoints configured")
        if timeout <= 0 or connect_timeout <= 0:
            raise ConfigError("timeouts must be greater than zero")
        if retry_deadline <= 0:
            raise ConfigError("the retry deadline must be greater than zero")
        if max_retries < 0 or max_redirects < 0:
            raise ConfigError("max_retries and max_redirects cannot be negative")
        if backoff_initial < 0 or backoff_max < 0 or max_retry_after < 0:
            raise ConfigError("backoff and retry-after limits cannot be negative")
        if max_response_bytes <= 0:
            raise ConfigError("max_response_bytes must be greater than zero")
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_retries = max_retries
        self.retry_deadline = float(retry_deadline)
        self.backoff_initial = float(backoff_initial)
        self.backoff_max = float(backoff_max)
        self.max_redirects = max_redirects
        self.max_retry_after = float(max_retry_after)
        self.max_response_bytes = max_response_bytes
        self._endpoints = _Endpoints(configured)
        self._pool = _Pool(self.connect_timeout, max_idle_connections)

    # -- lifecycle -------------------------------------------------------

    def close(self) -> None:
        """Closes idle connections. The client stays usable (it reconnects)."""
        self._pool.close()
        self._pool = _Pool(self.connect_timeout, self._pool._max_idle)

    def __enter__(self) -> KVClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVClient({self.endpoints!r})"

    @property
    def endpoints(self) -> list[str]:
        """The configured endpoints, normalised."""
        return list(self._endpoints.configured)

    @property
    def current_endpoint(self) -> str:
        """The node the next call tries first: the learned primary, else the
        current configured endpoint."""
        return self._endpoints.current()

    # -- the API ---------------------------------------------------------

    def get(self, key: str, default: Any = None, *, consistent: bool = False) -> Any:
        """The value of ``key`` decoded by the codec rule (JSON value, else
        ``bytes``), or ``default`` when the key does not exist.

        Reads are served by whichever node is asked, so a secondary may lag
        the primary; ``consistent=True`` asks the primary for a linearizable
        read (a secondary redirects it there). A stored JSON ``null`` reads
        as ``None``; pass a sentinel ``default`` to tell it from "absent".
        """
        raw = self.get_raw(key, consistent=consistent)
        if raw is None:
            return default
        return decode_value(raw)

    def get_raw(self, key: str, *, consistent: bool = False) -> bytes | None:
        """The exact stored bytes of ``key``, or ``None`` when absent."""
        path = key_path(key)
        if consistent:
            path += "?consistent=true"
        resp = self._execute("GET", path, None, None)
        if resp.status == 404:
            err = _server_error(resp)
            # Only the server's own "no such key" means absent; another 404
            # (a wrong base URL) is an error, not an empty answer.
            if err.code == KEY_NOT_FOUND:
                return None
            raise err
        resp.raise_for_status()
        return resp.body

    def set(self, key: str, value: Value) -> int:
        """Stores ``value`` under ``key`` (bytes raw, anything else as JSON)
        and returns the write's log index once the server reports it durable
        (and committed, in a cluster)."""
        path = key_path(key)
        body = encode_value(value)
        resp = self._execute("PUT", path, body, "application/octet-stream")
        return int(_decode_field(resp, "set response", "index", int))

    def delete(self, key: str) -> bool:
        """Deletes ``key``; returns whether it existed. Deleting an absent key
        is not an error (so retries are safe)."""
        path = key_path(key)
        resp = self._execute("DELETE", path, None, None)
        return bool(_decode_field(resp, "delete response", "deleted", bool))

    def bulk_set(
        self, items: Iterable[tuple[str, Value]] | Mapping[str, Value]
    ) -> BulkResult:
        """Writes every ``(key, value)`` pair atomically: after the call, and
        after a crash, either all of them are visible or none is. Values are
        encoded like :meth:`set`'s; bytes travel as ``{"base64": ...}``.
        Duplicate keys: the last wins. Every key and value is checked before
        anything is sent."""
        pairs = items.items() if isinstance(items, Mapping) else items
        wire: list[dict[str, Any]] = []
        for key, value in pairs:
            validate_key(key)
            encoded = encode_value(value)
            if isinstance(value, (bytes, bytearray, memoryview)):
                wire_value: Any = {"base64": base64.b64encode(encoded).decode("ascii")}
            else:
                # JSON text is UTF-8, so it travels as a JSON string.
                wire_value = encoded.decode("utf-8")
            wire.append({"key": key, "value": wire_value})
        body = json.dumps({"items": wire}, separators=(",", ":")).encode("utf-8")
        resp = self._execute("POST", "/v1/bulk", body, "application/json")
        doc = _decode_json(resp, "bulk response")
        try:
            return BulkResult(index=int(doc["index"]), count=int(doc["count"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DecodeError(
                f"cannot decode bulk response from {resp.endpoint}: {err!r}",
                endpoint=resp.endpoint,
            ) from err

    def search(self, q: str, limit: int = 10) -> list[SearchHit]:
        """Full-text search (BM25; nodes started with ``--index``), best hit
        first."""
        query = f"/v1/search?q={quote(q, safe='')}&limit={int(limit)}"
        return self._hits(self._execute("GET", query, None, None), "search response")

    def search_similar(self, q: str, top_k: int = 5) -> list[SearchHit]:
        """TF-IDF cosine similarity to ``q`` (``--index``), best first."""
        query = f"/v1/similar?q={quote(q, safe='')}&top_k={int(top_k)}"
        return self._hits(self._execute("GET", query, None, None), "similar response")

    def status(self) -> dict[str, Any]:
        """The answering node's status document (``GET /v1/status``): node id,
        mode, role, epoch, indexes, peers and their lag."""
        doc = _decode_json(self._execute("GET", "/v1/status", None, None), "status")
        if not isinstance(doc, dict):
            raise DecodeError("status is not a JSON object")
        return doc

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> Response:
        """Any request, with the same primary following, retries and limits as
        the typed calls: for endpoints without a method here (admin, debug
        options such as ``?debug_flaky=``). Only for idempotent requests, as
        it may be sent more than once. Error statuses other than the
        retryable ones are returned, not raised; see
        :meth:`Response.raise_for_status`."""
        if not path.startswith("/"):
            path = "/" + path
        if body is not None and content_type is None:
            content_type = "application/octet-stream"
        return self._execute(method.upper(), path, body, content_type)

    # Aliases in the naming style of the Go and C# clients' users.
    Get = get
    Set = set
    Delete = delete
    BulkSet = bulk_set

    # -- the retry/redirect loop ----------------------------------------

    def _execute(
        self, method: str, path: str, body: bytes | None, content_type: str | None
    ) -> Response:
        """Returns the first answer that is neither a redirect nor a retryable
        status; raises the last error when the budget runs out."""
        deadline = time.monotonic() + self.retry_deadline
        target = self._endpoints.current()
        retries = 0
        # Redirects in a row since the last failure. Reset on retry: during a
        # failover "redirect to the old primary, which is down" legitimately
        # repeats, and is bounded by the retry budget instead.
        hops = 0
        while True:
            remaining = deadline - time.monotonic()
            attempt_timeout = max(min(self.timeout, remaining), 0.001)
            hint: str | None = None
            try:
                resp = self._attempt(target, method, path, body, content_type, attempt_timeout)
            except KVError as err:
                if not err.retryable:
                    raise
                error: KVError = err
            else:
                if resp.status in (307, 308):
                    hops += 1
                    nxt = _redirect_target(resp.headers, path)
                    if nxt is not None:
                        if hops > self.max_redirects:
                            raise RedirectLoopError(
                                f"gave up following the primary after {hops} redirects (last: {nxt})",
                                endpoint=nxt,
                            )
                        self._endpoints.follow(nxt)
                        target = nxt
                        continue
                    error = NoPrimaryError(
                        f"{resp.endpoint} answered {resp.status} without naming a primary",
                        endpoint=resp.endpoint,
                        status=resp.status,
                    )
                elif resp.status in RETRYABLE_STATUSES:
                    hint = _primary_hint(resp.headers)
                    error = _server_error(resp)
                else:
                    return resp
            asked = getattr(error, "retry_after", None)
            # A server that refused the request outright and said when to come
            # back (writes paused for a mode switch or a handover, no primary
            # yet) is retried until the deadline: nothing was written. Every
            # other failure, a commit timeout included (the write may still
            # commit), counts against max_retries; max_retries=0 means none.
            paused = asked is not None and error.was_not_applied
            if retries >= self.max_retries and not (paused and self.max_retries > 0):
                raise error
            if isinstance(asked, (int, float)):
                delay = min(float(asked), self.max_retry_after)
            else:
                delay = self._backoff(retries)
            # An attempt with almost no time left can only time out, and its
            # timeout would hide the real reason (say, the server's 503).
            if time.monotonic() + delay + _MIN_USEFUL_ATTEMPT >= deadline:
                raise error
            retries += 1
            hops = 0
            target = self._endpoints.failed(target, hint)
            time.sleep(delay)

    def _backoff(self, retry: int) -> float:
        ceiling = min(self.backoff_max, self.backoff_initial * (2 ** min(retry, 62)))
        return random.uniform(ceiling / 2, ceiling)

    def _attempt(
        self,
        endpoint: str,
        method: str,
        path: str,
        body: bytes | None,
        content_type: str | None,
        timeout: float,
    ) -> Response:
        """One HTTP exchange with one node, body included. A reused keep-alive
        connection that the server closed meanwhile is replaced once, at no
        cost to the retry budget."""
        prefix = urlsplit(endpoint).path
        headers = {"User-Agent": _USER_AGENT, "Accept": "*/*"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        while True:
            conn, reused = self._pool.take(endpoint)
            conn.connect_timeout = min(self.connect_timeout, timeout)
            if conn.sock is None:
                try:
                    conn.connect()
                except socket.timeout as err:
                    conn.close()
                    raise ConnectError(
                        f"cannot connect to {endpoint}: connect timed out", endpoint=endpoint
                    ) from err
                except OSError as err:
                    conn.close()
                    raise ConnectError(
                        f"cannot connect to {endpoint}: {_os_reason(err)}", endpoint=endpoint
                    ) from err
            assert conn.sock is not None
            conn.sock.settimeout(timeout)
            try:
                conn.request(method, prefix + path, body=body, headers=headers)
                http_resp = conn.getresponse()
                data = self._read_body(endpoint, http_resp)
            except socket.timeout as err:
                conn.close()
                raise KVTimeoutError(
                    f"request to {endpoint} timed out after {timeout * 1000:.0f} ms",
                    endpoint=endpoint,
                ) from err
            except ResponseTooLargeError:
                conn.close()
                raise
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                if reused and isinstance(
                    err,
                    (
                        http.client.RemoteDisconnected,
                        BrokenPipeError,
                        ConnectionResetError,
                        http.client.BadStatusLine,
                    ),
                ):
                    continue  # the idle connection had been closed by the server
                raise TransportError(
                    f"HTTP exchange with {endpoint} failed: {_os_reason(err)}", endpoint=endpoint
                ) from err
            resp_headers = {name.lower(): value for name, value in http_resp.getheaders()}
            if http_resp.will_close:
                conn.close()
            else:
                self._pool.give_back(endpoint, conn)
            return Response(endpoint, http_resp.status, resp_headers, data)

    def _read_body(self, endpoint: str, resp: http.client.HTTPResponse) -> bytes:
        limit = self.max_response_bytes
        too_large = ResponseTooLargeError(
            f"response from {endpoint} exceeds the limit of {limit} bytes", endpoint=endpoint
        )
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        data = resp.read(limit + 1)
        if len(data) > limit:
            raise too_large
        if not resp.isclosed():
            # Whatever is left (nothing, for a well-formed answer) must be
            # consumed for the connection to be reusable.
            resp.read()
        return data

    @staticmethod
    def _hits(resp: Response, what: str) -> list[SearchHit]:
        doc = _decode_json(resp, what)
        try:
            return [SearchHit(key=str(h["key"]), score=float(h["score"])) for h in doc["hits"]]
        except (KeyError, TypeError, ValueError) as err:
            raise DecodeError(
                f"cannot decode {what} from {resp.endpoint}: {err!r}", endpoint=resp.endpoint
            ) from err


def _decode_json(resp: Response, what: str) -> Any:
    resp.raise_for_status()
    try:
        return json.loads(resp.body)
    except ValueError as err:
        raise DecodeError(
            f"cannot decode {what} from {resp.endpoint}: {err}", endpoint=resp.endpoint
        ) from err


def _decode_field(resp: Response, what: str, field: str, kind: type) -> Any:
    doc = _decode_json(resp, what)
    value = doc.get(field) if isinstance(doc, dict) else None
    if not isinstance(value, kind):
        raise DecodeError(
            f"cannot decode {what} from {resp.endpoint}: no {kind.__name__} field {field!r}",
            endpoint=resp.endpoint,
        )
    return value


def _primary_hint(headers: Mapping[str, str]) -> str | None:
    """The primary named by ``X-KV-Primary``, if it is a usable base URL."""
    value = headers.get(PRIMARY_HEADER.lower(), "").strip()
    if not value:
        return None
    try:
        return normalize_endpoint(value)
    except InvalidEndpointError:
        return None


def _redirect_target(headers: Mapping[str, str], path: str) -> str | None:
    """Where a redirect points, as a base URL. ``X-KV-Primary`` wins (it is a
    base URL); ``Location`` is a request URL, from which the request path is
    cut (or, if it was rewritten, the origin is kept)."""
    primary = _primary_hint(headers)
    if primary is not None:
        return primary
    location = headers.get("location", "").strip()
    if "://" not in location:
        return None  # a relative Location names no other node
    try:
        if location.endswith(path):
            return normalize_endpoint(location[: -len(path)])
        parts = urlsplit(location)
        return normalize_endpoint(f"{parts.scheme}://{parts.netloc}")
    except (InvalidEndpointError, ValueError):
        return None


def _parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """kvd's finer ``X-KV-Retry-After-Ms`` (a mode switch's pause is usually
    well under a second), else ``Retry-After`` in its delta-seconds form (what
    kvd sends); the HTTP-date form is ignored and backoff takes over."""
    ms = headers.get(RETRY_AFTER_MS_HEADER.lower(), "").strip()
    if ms.isdigit():
        return int(ms) / 1000.0
    value = headers.get("retry-after", "").strip()
    try:
        secs = float(value)
    except ValueError:
        return None
    if secs < 0 or secs != secs:
        return None
    return secs


def _server_error(resp: Response) -> ServerError:
    """The error for a non-success answer, from its JSON error body, or from
    the status and a body prefix when the body is not one."""
    status = resp.status

    def fallback() -> str:
        text = _one_line(resp.body.decode("utf-8", errors="replace"))
        return text or (http.client.responses.get(status, "unknown status"))

    code = f"http_{status}"
    message = ""
    try:
        doc = json.loads(resp.body)
        detail = doc["error"]
        if isinstance(detail.get("code"), str) and detail["code"]:
            code = detail["code"]
        if isinstance(detail.get("message"), str):
            message = _one_line(detail["message"])
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    cls = UnavailableError if status in RETRYABLE_STATUSES else ServerError
    return cls(
        message or fallback(),
        endpoint=resp.endpoint,
        status=status,
        code=code,
        retry_after=_parse_retry_after(resp.headers),
    )


def _one_line(text: str) -> str:
    out = " ".join(text.split())
    if len(out) > _MAX_ERROR_MESSAGE_CHARS:
        out = out[:_MAX_ERROR_MESSAGE_CHARS] + "..."
    return out


def _preview(key: str) -> str:
    return repr(key) if len(key) <= 64 else repr(key[:64]) + "..."


def _os_reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror} (os error {err.errno})"
    return str(err) or type(err).__name__
