"""The exceptions of the kvstore client.

Every exception raised by :class:`kvstore.client.KVClient` is a
:class:`KVError`, which carries

- ``code``: a stable snake_case string for scripts -- the server's own error
  code (``value_too_large``, ``invalid_key``, ...) when a node answered with
  an error, a client-side code (``connect``, ``timeout``, ...) otherwise;
- ``retryable``: whether the same call may succeed later or elsewhere (the
  client has already retried it within its budget when you see it);
- ``endpoint``: the node involved, when there was one;
- ``status``: the HTTP status, when a node answered with one.

The codes mirror the Rust client's (``kvclient::Error::code``), so a Python
program and the ``kvclient`` CLI report the same failure the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "KVError",
    "InvalidKeyError",
    "InvalidValueError",
    "ConfigError",
    "InvalidEndpointError",
    "ServerError",
    "UnavailableError",
    "TransportError",
    "ConnectError",
    "KVTimeoutError",
    "DecodeError",
    "ResponseTooLargeError",
    "RedirectLoopError",
    "NoPrimaryError",
    "InvalidRequestError",
    "PreconditionFailedError",
    "LeaseNotFoundError",
    "CompactedError",
    "LockTimeoutError",
    "Current",
    "RETRYABLE_STATUSES",
    "NOT_APPLIED_CODES",
    "NOT_WRITTEN_CODES",
]

#: Server codes of refusals that wrote nothing (the same set as the Rust
#: client's ``Error::was_not_applied``).
NOT_APPLIED_CODES = frozenset({"writes_paused", "transfer_in_progress", "no_primary", "overloaded"})

#: 5xx codes of refusals before anything was logged (docs/DESIGN.md §2.7,
#: "was it written? no"); any other 5xx may hide a logged write. The same
#: set as the Rust client's.
NOT_WRITTEN_CODES = NOT_APPLIED_CODES | frozenset(
    {"memory_full", "storage_unavailable", "data_dir_lost", "wal_unavailable", "write_superseded"}
)

#: Statuses that mean "not now" rather than "not like this": overloaded,
#: paused for a mode switch, commit timed out, proxy trouble.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


class KVError(Exception):
    """Base class of every error the client raises."""

    code: str = "kv_error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint
        self.status = status

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"

    @property
    def was_not_applied(self) -> bool:
        """Whether the server refused the request before doing anything, so
        that retrying a write cannot apply it twice: writes paused (mode
        switch), a primary handing over, no primary yet, or overload."""
        return self.code in NOT_APPLIED_CODES

    @property
    def outcome_unknown(self) -> bool:
        """Whether a write that failed this way may have been applied all
        the same: the answer was lost (a timeout, a connection broken after
        the request went out), or the node logged the write and could not
        say whether it committed (503 ``commit_timeout``, ``quorum_timeout``,
        or any 5xx outside :data:`NOT_WRITTEN_CODES`). The client does not
        retry a conditional write after such a failure; read the key back to
        learn what happened."""
        return False


class InvalidKeyError(KVError, ValueError):
    """The key breaks the server's key rules (UTF-8, 1..=1024 bytes, no NUL,
    not ``.`` or ``..``); nothing was sent."""

    code = "invalid_key"


class InvalidValueError(KVError, TypeError):
    """The value cannot be stored: not bytes and not JSON-encodable (a set, a
    dict with non-string keys, NaN, an object...). Nothing was sent."""

    code = "invalid_value"


class ConfigError(KVError, ValueError):
    """An unusable client setting (no endpoints, a non-positive timeout)."""

    code = "invalid_config"


class InvalidEndpointError(ConfigError):
    """A configured or server-advertised URL is not a usable ``http://`` base
    URL."""

    code = "invalid_endpoint"


class ServerError(KVError):
    """A node answered with an error status. ``code`` is the server's
    snake_case code from its ``{"error": {"code", "message"}}`` body, or
    ``http_<status>`` when the body was not one."""

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int,
        code: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint, status=status)
        self.code = code
        self.retry_after = retry_after
        self.retryable = status in RETRYABLE_STATUSES

    def __str__(self) -> str:
        return f"{self.endpoint} answered {self.status}: {self.message} ({self.code})"

    @property
    def outcome_unknown(self) -> bool:
        return (self.status or 0) >= 500 and self.code not in NOT_WRITTEN_CODES


@dataclass(frozen=True)
class Current:
    """A key's state as a failed precondition reports it: whether it exists
    and its versions (all 0 when it does not)."""

    exists: bool
    create_index: int = 0
    #: Log index of its last write: what ``if_version`` names.
    mod_index: int = 0
    #: Writes since its creation (1 after the first).
    version: int = 0

    def __str__(self) -> str:
        if not self.exists:
            return "the key does not exist"
        return f"the key has mod_index {self.mod_index}, version {self.version}"


class PreconditionFailedError(ServerError):
    """412 ``precondition_failed``: a conditional write's precondition did
    not hold, and nothing was written. ``current`` is the key's state when
    the node checked, so a compare-and-swap loop can retry from it."""

    def __init__(self, message: str, *, endpoint: str, current: Current) -> None:
        super().__init__(message, endpoint=endpoint, status=412, code="precondition_failed")
        self.current = current

    def __str__(self) -> str:
        return f"{self.endpoint} answered 412: {self.message} ({self.code}; {self.current})"


class LeaseNotFoundError(ServerError):
    """404 ``lease_not_found``: the lease named is not alive (expired,
    revoked or never granted); nothing was written (docs/DESIGN.md §2.16)."""


class CompactedError(ServerError):
    """A watch asked for records the node no longer holds (410
    ``compacted``, or an error event ``compacted``). ``oldest_index`` is the
    first index it can stream from: re-read the range and watch from the
    page's ``index`` + 1."""

    def __init__(self, message: str, *, endpoint: str, oldest_index: int) -> None:
        super().__init__(message, endpoint=endpoint, status=410, code="compacted")
        self.oldest_index = oldest_index


class UnavailableError(ServerError):
    """A retryable error status (429, 502, 503, 504): overloaded, paused, or a
    write that did not commit in time (it may still commit; retrying a write
    is safe because every write here is idempotent)."""


class TransportError(KVError):
    """The HTTP exchange broke (connection reset, malformed answer)."""

    code = "transport"
    retryable = True

    @property
    def outcome_unknown(self) -> bool:
        # The request may have reached the node before the exchange broke.
        return True


class ConnectError(TransportError):
    """No TCP connection could be made (refused, unreachable, connect
    timeout): usually the node is down."""

    code = "connect"

    @property
    def outcome_unknown(self) -> bool:
        return False  # nothing was sent


class TLSError(ConnectError):
    """The TLS handshake failed: the node's certificate does not chain to
    ``ca_file`` (or names another host), or the node refused ours. A setting
    to fix, so it is not retried."""

    code = "tls"
    retryable = False


class KVTimeoutError(TransportError, TimeoutError):
    """No complete answer within the request timeout (a stopped or
    overloaded node)."""

    code = "timeout"


class DecodeError(KVError):
    """A 2xx answer whose body is not what the API promises."""

    code = "decode"


class ResponseTooLargeError(KVError):
    """The answer exceeded the client's ``max_response_bytes``."""

    code = "response_too_large"


class RedirectLoopError(KVError):
    """Redirects did not settle on a primary within the hop limit (two nodes
    that each believe the other is primary)."""

    code = "redirect_loop"


class InvalidRequestError(KVError, ValueError):
    """A request the client refuses to send whatever the key (an empty prefix
    to delete, both ``if_version`` and ``if_absent``, a page size out of
    range, a range that starts after its end); nothing was sent."""

    code = "invalid_request"


class LockTimeoutError(KVError, TimeoutError):
    """A lock was not taken within its ``wait_s``."""

    code = "lock_timeout"


class NoPrimaryError(KVError):
    """A redirect that names no primary: the node is not primary and does not
    know who is (an election is in progress)."""

    code = "no_primary"
    retryable = True
