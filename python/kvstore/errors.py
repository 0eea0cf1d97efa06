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
    "RETRYABLE_STATUSES",
    "NOT_APPLIED_CODES",
]

#: Server codes of refusals that wrote nothing (the same set as the Rust
#: client's ``Error::was_not_applied``).
NOT_APPLIED_CODES = frozenset({"writes_paused", "transfer_in_progress", "no_primary", "overloaded"})

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


class UnavailableError(ServerError):
    """A retryable error status (429, 502, 503, 504): overloaded, paused, or a
    write that did not commit in time (it may still commit; retrying a write
    is safe because every write here is idempotent)."""


class TransportError(KVError):
    """The HTTP exchange broke (connection reset, malformed answer)."""

    code = "transport"
    retryable = True


class ConnectError(TransportError):
    """No TCP connection could be made (refused, unreachable, connect
    timeout): usually the node is down."""

    code = "connect"


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


class NoPrimaryError(KVError):
    """A redirect that names no primary: the node is not primary and does not
    know who is (an election is in progress)."""

    code = "no_primary"
    retryable = True
