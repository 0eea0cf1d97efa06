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

Retrying writes is sound because every plain write is idempotent: a PUT,
DELETE or bulk write repeated with the same content leaves the same state. A
conditional write (``if_version=``, ``if_absent=``) or a transaction with
compares is retried only after failures that wrote nothing: after one whose
outcome is unknown (a timeout, 503 ``commit_timeout``) the first attempt may
have won, and a retry would then be refused by its own success. That error is
raised instead (its ``outcome_unknown`` is true), so a 412 from this client
always means "this write did not happen".

Values: ``bytes`` are stored raw, every other value as JSON text; ``get``
returns the decoded JSON value, or ``bytes`` for values that are not JSON.
See :mod:`kvstore.codec` for the exact rule.

A client is thread-safe: threads share its connection pool and its knowledge
of the primary.

Over TLS (``https://`` endpoints, docs/DESIGN.md §12) the node's certificate
is verified against ``ca_file`` and no other roots, and ``cert_file`` /
``key_file`` are presented when the node asks for a client certificate.
"""

from __future__ import annotations

import base64
import builtins
import http.client
import json
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from .codec import Value, decode_value, encode_value
from .errors import (
    RETRYABLE_STATUSES,
    CompactedError,
    ConfigError,
    ConnectError,
    Current,
    DecodeError,
    InvalidEndpointError,
    InvalidKeyError,
    InvalidRequestError,
    KVError,
    KVTimeoutError,
    LeaseNotFoundError,
    NoPrimaryError,
    PreconditionFailedError,
    RedirectLoopError,
    ResponseTooLargeError,
    ServerError,
    TLSError,
    TransportError,
    UnavailableError,
)

if TYPE_CHECKING:
    from .lock import Lock
    from .watch import Watch

__all__ = [
    "KVClient",
    "SearchHit",
    "BulkResult",
    "Item",
    "Versioned",
    "Current",
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

#: Headers with a key's versions on ``GET /v1/kv/{key}`` (docs/DESIGN.md §2.10).
MOD_INDEX_HEADER = "X-KV-Mod-Index"
CREATE_INDEX_HEADER = "X-KV-Create-Index"
VERSION_HEADER = "X-KV-Version"

#: Headers of a key with a deadline (docs/DESIGN.md §2.15): the milliseconds
#: it has left, and its lease.
TTL_MS_HEADER = "X-KV-TTL-Ms"
LEASE_HEADER = "X-KV-Lease"

#: The longest TTL the node takes: ten years, in milliseconds.
MAX_TTL_MS = 315_360_000_000

#: Most keys one range page may ask for.
MAX_PAGE_SIZE = 10_000

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
class Item:
    """One key of a range, with its versions (docs/DESIGN.md §2.11)."""

    key: str
    #: The exact stored bytes; ``None`` in a keys-only listing.
    raw: bytes | None
    #: Log index of the write that created the key.
    create_index: int
    #: Log index of its last write: what ``if_version=`` takes.
    mod_index: int
    #: Writes since its creation (1 after the first).
    version: int
    #: The milliseconds it had left when read; ``None`` when permanent.
    ttl_ms: int | None = None
    #: The lease it lives by, if any.
    lease: int | None = None

    @property
    def value(self) -> Any:
        """The value decoded by the codec rule (JSON value, else ``bytes``);
        ``None`` in a keys-only listing."""
        return None if self.raw is None else decode_value(self.raw)


@dataclass(frozen=True)
class Versioned:
    """A value with its key's versions, from :meth:`KVClient.get_versioned`."""

    #: The exact stored bytes.
    raw: bytes
    create_index: int
    #: Log index of the key's last write: what ``if_version=`` takes.
    mod_index: int
    version: int
    #: The ``ETag`` as sent (``"<mod_index>"``; masterless: the key's stamp).
    etag: str | None
    #: The milliseconds the key had left (``X-KV-TTL-Ms``); ``None`` when
    #: it is permanent (docs/DESIGN.md §2.15).
    ttl_ms: int | None = None
    #: The lease it lives by (``X-KV-Lease``), if any (§2.16).
    lease: int | None = None

    @property
    def value(self) -> Any:
        """The value decoded by the codec rule (JSON value, else ``bytes``)."""
        return decode_value(self.raw)


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
    """A base URL in canonical form: ``http[s]://host:port[/prefix]``,
    ``http://`` added when no scheme is given, no trailing slash."""
    trimmed = raw.strip()
    if not trimmed:
        raise InvalidEndpointError(f"invalid endpoint {raw!r}: empty")
    with_scheme = trimmed if "://" in trimmed else f"http://{trimmed}"
    try:
        parts = urlsplit(with_scheme)
        port = parts.port
    except ValueError as err:
        raise InvalidEndpointError(f"invalid endpoint {raw!r}: {err}") from err
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidEndpointError(
            f"invalid endpoint {raw!r}: only http:// and https:// endpoints are supported"
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
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def tls_context(
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """The TLS settings of a client: trusts the CA certificates of
    ``ca_file`` and no others (a cluster has its own CA; without one nothing
    is trusted), checks the host name, and presents ``cert_file`` with
    ``key_file`` when a node asks for a client certificate."""
    if (cert_file is None) != (key_file is None):
        raise ConfigError("a client certificate needs both cert_file and key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        if ca_file is not None:
            ctx.load_verify_locations(cafile=os.fspath(ca_file))
        if cert_file is not None and key_file is not None:
            ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"TLS files unusable: {err}") from err
    return ctx


class _Connection(http.client.HTTPConnection):
    """An HTTP/1.1 keep-alive connection whose connect (the TLS handshake
    included, over TLS) has its own timeout."""

    def __init__(
        self,
        host: str,
        port: int | None,
        connect_timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self.connect_timeout = connect_timeout
        self.tls = tls

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        self.sock = sock


class _Pool:
    """Idle keep-alive connections per endpoint, shared by threads."""

    def __init__(
        self,
        connect_timeout: float,
        max_idle_per_endpoint: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._idle: dict[str, list[_Connection]] = {}
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_endpoint
        self._tls = tls
        self._closed = False

    def take(self, endpoint: str) -> tuple[_Connection, bool]:
        """A connection to ``endpoint`` and whether it was reused."""
        with self._lock:
            idle = self._idle.get(endpoint)
            if idle:
                return idle.pop(), True
        parts = urlsplit(endpoint)
        host = parts.hostname or ""
        tls = self._tls if parts.scheme == "https" else None
        return _Connection(host, parts.port, self._connect_timeout, tls), False

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

    TLS (``https://`` endpoints): ``ca_file`` is the CA that the nodes'
    certificates must chain to; ``cert_file`` and ``key_file`` a client
    certificate (a node certificate of the cluster CA is what the admin
    routes take over TLS). A failed handshake raises
    :class:`~kvstore.errors.TLSError`, which is not retried.

    ``token``: a bearer token sent with every request, for nodes with a
    token file (``--auth-file``); without one, ``$KV_TOKEN`` if set. A node
    answers a missing or unknown token with 401 ``unauthenticated`` and a
    token without the role with 403 ``permission_denied``
    (:class:`~kvstore.errors.ServerError`).
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
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        token: str | None = None,
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
        self._tls = tls_context(ca_file, cert_file, key_file)
        self._pool = _Pool(self.connect_timeout, max_idle_connections, self._tls)
        token = token if token is not None else os.environ.get("KV_TOKEN")
        if token is not None and (not token.strip() or not token.isprintable() or not token.isascii()):
            raise ConfigError("the token must be printable ASCII, not empty")
        self._auth: dict[str, str] = {"Authorization": f"Bearer {token.strip()}"} if token else {}

    # -- lifecycle -------------------------------------------------------

    def close(self) -> None:
        """Closes idle connections. The client stays usable (it reconnects)."""
        self._pool.close()
        self._pool = _Pool(self.connect_timeout, self._pool._max_idle, self._tls)

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
    def endpoints(self) -> builtins.list[str]:
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
        resp = self._get_key(key, consistent)
        return None if resp is None else resp.body

    def get_versioned(self, key: str, *, consistent: bool = False) -> Versioned | None:
        """The value of ``key`` with its versions (``create_index``,
        ``mod_index``, ``version``, from the answer's headers), or ``None``
        when absent. ``consistent=True`` as for :meth:`get`: the start of a
        compare-and-swap that should not begin from a stale secondary."""
        resp = self._get_key(key, consistent)
        return None if resp is None else _versioned(resp)

    def _get_key(self, key: str, consistent: bool) -> Response | None:
        """The 200 answer to a GET of ``key``, or ``None`` when absent."""
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
        return resp.raise_for_status()

    def set(
        self,
        key: str,
        value: Value,
        *,
        if_version: int | None = None,
        if_absent: bool = False,
        debug_flaky: float | None = None,
        ttl_ms: int | None = None,
        lease: int | None = None,
        keep_ttl: bool = False,
    ) -> int:
        """Stores ``value`` under ``key`` (bytes raw, anything else as JSON)
        and returns the write's log index (the key's new ``mod_index``) once
        the server reports it durable (and committed, in a cluster).

        ``if_version=N`` writes only if the key exists with ``mod_index`` N,
        ``if_absent=True`` only if it does not exist; otherwise
        :class:`~kvstore.errors.PreconditionFailedError` (nothing written,
        ``current`` says what the key is now). Such a write is not retried
        after a failure whose outcome is unknown: that error is raised, its
        ``outcome_unknown`` true; read the key back to learn what happened
        (a value that names its writer makes that read decisive).
        ``debug_flaky=P`` (nodes with ``--enable-debug``) logs the write but
        skips applying it with probability P (docs/DESIGN.md §2.9).

        At most one of ``ttl_ms=N`` (the key expires N ms after the node
        takes the write), ``lease=ID`` (it lives as long as the lease; a
        lease that is not alive raises
        :class:`~kvstore.errors.LeaseNotFoundError`, nothing written) and
        ``keep_ttl=True`` (it keeps the deadline or lease it had); without
        any the key is permanent (docs/DESIGN.md §2.15)."""
        headers = _precondition(if_version, if_absent)
        expiry = _expiry_params(ttl_ms, lease, keep_ttl)
        if headers and debug_flaky is not None:
            # The node refuses it too (400): a conditional write is a
            # transaction, which debug_flaky does not apply to.
            raise InvalidRequestError("debug_flaky does not go with if_version or if_absent")
        path = key_path(key) + _flaky_query(debug_flaky)
        if expiry:
            query = "&".join(f"{k}={v}" for k, v in expiry.items())
            path += ("&" if "?" in path else "?") + query
        body = encode_value(value)
        resp = self._execute(
            "PUT", path, body, "application/octet-stream", headers, conditional=bool(headers)
        )
        return int(_decode_field(resp, "set response", "index", int))

    def delete(self, key: str, *, if_version: int | None = None) -> bool:
        """Deletes ``key``; returns whether it existed. Deleting an absent key
        is not an error (so retries are safe). ``if_version=N`` deletes only
        if the key exists with ``mod_index`` N, as for :meth:`set`."""
        path = key_path(key)
        headers = _precondition(if_version, False)
        resp = self._execute("DELETE", path, None, None, headers, conditional=bool(headers))
        return bool(_decode_field(resp, "delete response", "deleted", bool))

    def delete_prefix(self, prefix: str) -> int:
        """Deletes every key that starts with ``prefix`` in one log record
        (atomically); returns how many there were. An empty prefix is refused
        before sending: it would delete every key."""
        if prefix == "":
            raise InvalidRequestError("the prefix to delete is empty (that would delete every key)")
        validate_key(prefix)  # a prefix of a valid key is a valid key
        resp = self._execute("DELETE", "/v1/kv?prefix=" + quote(prefix, safe=""), None, None)
        return int(_decode_field(resp, "delete prefix response", "deleted", int))

    def list(
        self,
        prefix: str = "",
        *,
        keys_only: bool = False,
        page_size: int | None = None,
        consistent: bool = False,
    ) -> Iterator[Item]:
        """The keys that start with ``prefix`` (all keys for ``""``), in byte
        order, as :class:`Item` s; a generator that reads the next page (of
        ``page_size`` keys, the node's default 100) when it needs it. A key
        present throughout the listing is seen exactly once; one written or
        deleted meanwhile may or may not be."""
        return self._items(_bounds({"prefix": prefix}), keys_only, page_size, consistent)

    def range(
        self,
        start: str | None = None,
        end: str | None = None,
        *,
        keys_only: bool = False,
        page_size: int | None = None,
        consistent: bool = False,
    ) -> Iterator[Item]:
        """The keys ``k`` with ``start <= k < end`` (either end open when
        ``None``), in byte order; paged as :meth:`list`."""
        return self._items(_span(start, end), keys_only, page_size, consistent)

    def count(
        self,
        prefix: str | None = None,
        *,
        start: str | None = None,
        end: str | None = None,
        consistent: bool = False,
    ) -> int:
        """How many keys start with ``prefix``, or lie in ``[start, end)``
        (every key without either), in one request."""
        if prefix is not None and (start is not None or end is not None):
            raise InvalidRequestError("count takes a prefix or start/end, not both")
        params = _bounds({"prefix": prefix}) if prefix is not None else _span(start, end)
        params["count_only"] = "true"
        if consistent:
            params["consistent"] = "true"
        resp = self._execute("GET", _range_path(params), None, None)
        return int(_decode_field(resp, "range count", "count", int))

    def txn(
        self,
        compare: Sequence[Mapping[str, Any]] | None = None,
        success: Sequence[Mapping[str, Any]] | None = None,
        failure: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Runs a transaction (docs/DESIGN.md §2.13) as one log record: if
        every compare holds the ``success`` ops run, else the ``failure``
        ops. The lists hold the API's plain dicts, values as JSON strings or
        ``{"base64": ...}``::

            kv.txn(compare=[{"key": "a", "target": "mod_index", "op": "==", "value": 9}],
                   success=[{"put": {"key": "a", "value": "new"}}],
                   failure=[{"get": {"key": "a"}}])

        Returns the decoded answer ``{"succeeded", "index", "results"}``.
        The node checks the body (400 ``invalid_txn`` naming the part at
        fault). With compares it is retried as a conditional write is."""
        body: dict[str, Any] = {}
        for name, ops in (("compare", compare), ("success", success), ("failure", failure)):
            if ops is not None:
                body[name] = [dict(op) for op in ops]
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        resp = self._execute("POST", "/v1/txn", data, "application/json", conditional=bool(compare))
        doc = _decode_json(resp, "transaction answer")
        if not isinstance(doc, dict) or not isinstance(doc.get("succeeded"), bool):
            raise DecodeError(
                f"cannot decode transaction answer from {resp.endpoint}", endpoint=resp.endpoint
            )
        return doc

    def bulk_set(
        self,
        items: Iterable[tuple[str, Value]] | Mapping[str, Value],
        *,
        debug_flaky: float | None = None,
    ) -> BulkResult:
        """Writes every ``(key, value)`` pair atomically: after the call, and
        after a crash, either all of them are visible or none is. Values are
        encoded like :meth:`set`'s; bytes travel as ``{"base64": ...}``.
        Duplicate keys: the last wins. Every key and value is checked before
        anything is sent. ``debug_flaky`` as for :meth:`set`."""
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
        path = "/v1/bulk" + _flaky_query(debug_flaky)
        resp = self._execute("POST", path, body, "application/json")
        doc = _decode_json(resp, "bulk response")
        try:
            return BulkResult(index=int(doc["index"]), count=int(doc["count"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DecodeError(
                f"cannot decode bulk response from {resp.endpoint}: {err!r}",
                endpoint=resp.endpoint,
            ) from err

    # -- leases, locks, watch (docs/DESIGN.md §2.16, §2.17, §9.1) -------

    def lease_grant(self, ttl_ms: int) -> int:
        """Grants a lease of ``ttl_ms`` (1 ms ..= ten years); returns its id.
        Retried as a plain write: a repeated grant only makes a lease nobody
        holds, which expires."""
        body = json.dumps({"ttl_ms": _ttl_ms(ttl_ms)}).encode("utf-8")
        resp = self._execute("POST", "/v1/leases", body, "application/json")
        return int(_decode_field(resp, "lease grant answer", "id", int))

    def lease_keepalive(self, lease: int) -> dict[str, Any]:
        """Moves the lease's deadline to now + its TTL; returns the answer
        ``{"id", "ttl_ms", "index"}``. :class:`~kvstore.errors.LeaseNotFoundError`
        once it is not alive (its deadline passed, for good)."""
        path = f"/v1/leases/{_lease_id(lease)}/keepalive"
        doc = _decode_json(self._execute("POST", path, None, None), "lease keepalive answer")
        if not isinstance(doc, dict):
            raise DecodeError("lease keepalive answer is not a JSON object")
        return doc

    def lease_revoke(self, lease: int) -> int:
        """Ends the lease and deletes its keys, in one record; returns how
        many keys went. Retried only after failures that wrote nothing (a
        retry after its own success would be refused, 404)."""
        path = f"/v1/leases/{_lease_id(lease)}"
        resp = self._execute("DELETE", path, None, None, conditional=True)
        return int(_decode_field(resp, "lease revoke answer", "deleted", int))

    def lease_info(self, lease: int) -> dict[str, Any] | None:
        """``{"id", "ttl_ms", "remaining_ms", "keys", "more"}``, or ``None``
        once the lease is not alive on the answering node."""
        resp = self._execute("GET", f"/v1/leases/{_lease_id(lease)}", None, None)
        try:
            doc = _decode_json(resp, "lease info")
        except LeaseNotFoundError:
            return None
        if not isinstance(doc, dict):
            raise DecodeError("lease info is not a JSON object")
        return doc

    def lock(self, name: str, ttl_ms: int = 10_000, wait_s: float | None = None) -> Lock:
        """A lock over a lease, as a context manager::

            with kv.lock("locks/report", ttl_ms=5000, wait_s=10) as held:
                write_report(fencing_token=held.token)
                if held.lost():
                    ...  # stop using the token

        Entering takes it (:class:`~kvstore.errors.LockTimeoutError` when not
        taken within ``wait_s``; ``None``: wait as long as it takes); a
        thread keeps the lease alive every ``ttl_ms / 3``; leaving releases
        it. See :mod:`kvstore.lock`."""
        from .lock import Lock

        return Lock(self, name, ttl_ms=ttl_ms, wait_s=wait_s)

    def watch(
        self,
        prefix: str | None = None,
        *,
        key: str | None = None,
        start: str | None = None,
        end: str | None = None,
        from_index: int | None = None,
        prev_value: bool = False,
        progress_ms: int = 1000,
        reconnect_s: float | None = None,
    ) -> Watch:
        """The changes to ``key``, the keys under ``prefix`` or in ``[start,
        end)`` (every key without any), as an iterator of event dicts
        (docs/DESIGN.md §2.17) that resumes by itself on another node after a
        broken connection or ``watcher_too_slow``, so each event comes once,
        in order; progress events too. :class:`~kvstore.errors.CompactedError`
        when the node no longer holds the index to resume from. ``close()``
        ends it. Failures in a row last at most ``reconnect_s`` (default:
        the client's ``retry_deadline``). See :mod:`kvstore.watch`."""
        from .watch import Watch

        return Watch(
            self,
            prefix=prefix,
            key=key,
            start=start,
            end=end,
            from_index=from_index,
            prev_value=prev_value,
            progress_ms=progress_ms,
            reconnect_s=self.retry_deadline if reconnect_s is None else reconnect_s,
        )

    def _items(
        self, params: dict[str, str], keys_only: bool, page_size: int | None, consistent: bool
    ) -> Iterator[Item]:
        """Checks the arguments now, then pages lazily."""
        params = dict(params)
        if page_size is not None:
            if not 1 <= page_size <= MAX_PAGE_SIZE:
                raise InvalidRequestError(f"page_size {page_size} is not within 1..={MAX_PAGE_SIZE}")
            params["limit"] = str(int(page_size))
        for name, on in (("keys_only", keys_only), ("consistent", consistent)):
            if on:
                params[name] = "true"
        return self._pages(params)

    def _pages(self, params: dict[str, str]) -> Iterator[Item]:
        token: str | None = None
        while True:
            query = params if token is None else {**params, "page_token": token}
            resp = self._execute("GET", _range_path(query), None, None)
            doc = _decode_json(resp, "range page")
            items, token = _page(doc, resp.endpoint)
            yield from items
            if token is None:
                return
            if not items:
                # A node naming a next page after an empty one would have
                # this generator ask forever.
                raise DecodeError(
                    f"range page from {resp.endpoint} is empty but names a next page",
                    endpoint=resp.endpoint,
                )

    def search(self, q: str, limit: int = 10) -> builtins.list[SearchHit]:
        """Full-text search (BM25; nodes started with ``--index``), best hit
        first."""
        query = f"/v1/search?q={quote(q, safe='')}&limit={int(limit)}"
        return self._hits(self._execute("GET", query, None, None), "search response")

    def search_similar(self, q: str, top_k: int = 5) -> builtins.list[SearchHit]:
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
        self,
        method: str,
        path: str,
        body: bytes | None,
        content_type: str | None,
        headers: Mapping[str, str] | None = None,
        *,
        conditional: bool = False,
    ) -> Response:
        """Returns the first answer that is neither a redirect nor a retryable
        status; raises the last error when the budget runs out. A
        ``conditional`` request is not retried after a failure whose outcome
        is unknown (see the module docstring)."""
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
                resp = self._attempt(
                    target, method, path, body, content_type, headers, attempt_timeout
                )
            except KVError as err:
                if not err.retryable or (conditional and err.outcome_unknown):
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
                    if conditional and error.outcome_unknown:
                        raise error
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
        extra_headers: Mapping[str, str] | None,
        timeout: float,
    ) -> Response:
        """One HTTP exchange with one node, body included. A reused keep-alive
        connection that the server closed meanwhile is replaced once, at no
        cost to the retry budget."""
        prefix = urlsplit(endpoint).path
        headers = {"User-Agent": _USER_AGENT, "Accept": "*/*", **self._auth, **(extra_headers or {})}
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
                except ssl.SSLError as err:
                    conn.close()
                    raise TLSError(
                        f"TLS with {endpoint} failed: {err.reason or err}", endpoint=endpoint
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
    def _hits(resp: Response, what: str) -> builtins.list[SearchHit]:
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


def _versioned(resp: Response) -> Versioned:
    """The versions of a ``GET /v1/kv/{key}`` answer, from its headers."""

    def number(name: str) -> int:
        value = resp.headers.get(name.lower(), "").strip()
        if not value.isdigit():
            raise DecodeError(
                f"cannot decode versioned read from {resp.endpoint}: {name} is {value!r}",
                endpoint=resp.endpoint,
            )
        return int(value)

    def optional(name: str) -> int | None:
        return number(name) if name.lower() in resp.headers else None

    return Versioned(
        raw=resp.body,
        create_index=number(CREATE_INDEX_HEADER),
        mod_index=number(MOD_INDEX_HEADER),
        version=number(VERSION_HEADER),
        etag=resp.headers.get("etag"),
        ttl_ms=optional(TTL_MS_HEADER),
        lease=optional(LEASE_HEADER),
    )


def _expiry_params(ttl_ms: int | None, lease: int | None, keep_ttl: bool) -> dict[str, str]:
    """The query parameter of a put's deadline (docs/DESIGN.md §2.15), after
    the checks the node makes (400 ``invalid_ttl``)."""
    flags = (("ttl_ms", ttl_ms is not None), ("lease", lease is not None), ("keep_ttl", keep_ttl))
    given = [name for name, on in flags if on]
    if len(given) > 1:
        raise InvalidRequestError(f"{' and '.join(given)} exclude each other")
    if ttl_ms is not None:
        return {"ttl_ms": str(_ttl_ms(ttl_ms))}
    if lease is not None:
        return {"lease": str(_lease_id(lease))}
    if keep_ttl:
        return {"keep_ttl": "true"}
    return {}


def _ttl_ms(ttl_ms: int) -> int:
    """A TTL the node takes: an int of 1 ..= ten years in milliseconds."""
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or not 1 <= ttl_ms <= MAX_TTL_MS:
        raise InvalidRequestError(
            f"ttl_ms must be an int within 1 ..= {MAX_TTL_MS} (ten years), not {ttl_ms!r}"
        )
    return ttl_ms


def _lease_id(lease: int) -> int:
    if isinstance(lease, bool) or not isinstance(lease, int) or lease < 0:
        raise InvalidRequestError(f"a lease id is an int >= 0, not {lease!r}")
    return lease


def _precondition(if_version: int | None, if_absent: bool) -> dict[str, str]:
    """The ``If-Match`` / ``If-None-Match`` header of a conditional write
    (docs/DESIGN.md §2.12); none for a plain one."""
    if if_version is not None and if_absent:
        raise InvalidRequestError("if_version and if_absent exclude each other")
    if if_version is not None:
        if isinstance(if_version, bool) or not isinstance(if_version, int) or if_version < 0:
            raise InvalidRequestError(
                f"if_version must be a mod_index (an int >= 0), not {if_version!r}"
            )
        return {"If-Match": f'"{if_version}"'}
    if if_absent:
        return {"If-None-Match": "*"}
    return {}


def _flaky_query(debug_flaky: float | None) -> str:
    """``?debug_flaky=P`` for a write (docs/DESIGN.md §2.9), or nothing."""
    if debug_flaky is None:
        return ""
    if not 0.0 <= debug_flaky <= 1.0:  # NaN too
        raise InvalidRequestError(f"debug_flaky must be within 0.0..=1.0, not {debug_flaky!r}")
    return f"?debug_flaky={float(debug_flaky)!r}"


def _span(start: str | None, end: str | None) -> dict[str, str]:
    """The parameters of ``[start, end)``; refuses a start after the end, as
    the node would. Python orders str by code point, which is UTF-8's byte
    order."""
    if start is not None and end is not None and start > end:
        raise InvalidRequestError(f"range start {start!r} is after its end {end!r}")
    params = {}
    if start is not None:
        params["start"] = start
    if end is not None:
        params["end"] = end
    return _bounds(params)


def _bounds(params: dict[str, str]) -> dict[str, str]:
    """``params``, unless a bound or prefix is longer than a key can be (the
    node's 400 ``invalid_range``)."""
    for name, bound in params.items():
        size = len(bound.encode("utf-8", errors="surrogatepass"))
        if size > MAX_KEY_BYTES:
            raise InvalidRequestError(f"range {name} is {size} bytes, the limit is {MAX_KEY_BYTES}")
    return params


def _range_path(params: Mapping[str, str]) -> str:
    return "/v1/kv?" + "&".join(f"{name}={quote(v, safe='')}" for name, v in params.items())


def _page(doc: Any, endpoint: str) -> tuple[list[Item], str | None]:
    """A range page's items and its ``next_page_token``."""
    try:
        items = [_item(raw) for raw in doc["items"]]
        token = doc.get("next_page_token")
        if token is not None and not isinstance(token, str):
            raise TypeError(f"next_page_token is {token!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DecodeError(
            f"cannot decode range page from {endpoint}: {err!r}", endpoint=endpoint
        ) from err
    return items, token


def _item(raw: Mapping[str, Any]) -> Item:
    value = raw.get("value")
    return Item(
        key=str(raw["key"]),
        raw=None if value is None else _wire_bytes(value),
        create_index=int(raw["create_index"]),
        mod_index=int(raw["mod_index"]),
        version=int(raw["version"]),
        ttl_ms=None if raw.get("ttl_ms") is None else int(raw["ttl_ms"]),
        lease=None if raw.get("lease") is None else int(raw["lease"]),
    )


def _wire_bytes(value: Any) -> bytes:
    """The bytes of a value as the API's JSON carries it: a string (its
    UTF-8) or ``{"base64": "..."}``; ``ValueError`` for anything else."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and set(value) == {"base64"} and isinstance(value["base64"], str):
        return base64.b64decode(value["base64"], validate=True)
    raise ValueError(f"not a string or {{'base64': ...}}: {value!r}")


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
    if status == 404 and code == "lease_not_found":
        return LeaseNotFoundError(
            message or fallback(), endpoint=resp.endpoint, status=404, code=code
        )
    if status == 410 and code == "compacted":
        oldest = 0
        try:
            oldest = int(json.loads(resp.body).get("oldest_index", 0))
        except (ValueError, TypeError, AttributeError):
            pass
        return CompactedError(message or fallback(), endpoint=resp.endpoint, oldest_index=oldest)
    if status == 412 and code == "precondition_failed":
        current = _current(resp.body)
        if current is not None:
            return PreconditionFailedError(
                message or fallback(), endpoint=resp.endpoint, current=current
            )
    cls = UnavailableError if status in RETRYABLE_STATUSES else ServerError
    return cls(
        message or fallback(),
        endpoint=resp.endpoint,
        status=status,
        code=code,
        retry_after=_parse_retry_after(resp.headers),
    )


def _current(body: bytes) -> Current | None:
    """The key's state beside a 412's error (docs/DESIGN.md §2.12), if the
    body has it."""
    try:
        raw = json.loads(body)["current"]
        return Current(
            exists=bool(raw["exists"]),
            create_index=int(raw.get("create_index", 0)),
            mod_index=int(raw.get("mod_index", 0)),
            version=int(raw.get("version", 0)),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


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
