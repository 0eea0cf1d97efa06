"""Locks over leases, with fencing tokens (docs/DESIGN.md §9.1, §9.3).

Taking the lock: grant a lease of ``ttl_ms`` (a thread keeps it alive every
``ttl_ms / 3`` from then on), then put the key ``name`` with
``If-None-Match: *`` attached to it; the answer's index (the key's
``mod_index``) is the fencing token, larger for every new holder. While
another holds the key the contender polls it every 100 ms until it is gone,
or until ``wait_s`` is spent (:class:`~kvstore.errors.LockTimeoutError`).
The create is a conditional write: after a failure whose outcome is
unknown the key is read back, and held with our lease it is ours.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING

from .errors import (
    InvalidRequestError,
    KVError,
    LeaseNotFoundError,
    LockTimeoutError,
    PreconditionFailedError,
)

if TYPE_CHECKING:
    from .client import KVClient

__all__ = ["Lock", "POLL_INTERVAL_S", "judge_lost"]

#: How often a contender looks at a held lock's key, at most.
POLL_INTERVAL_S = 0.1


def judge_lost(lease_gone: bool, since_last_success_s: float, ttl_s: float) -> bool:
    """The keep-alive rule: lost when the node says the lease is gone, or no
    keep-alive sent within the last TTL succeeded."""
    return lease_gone or since_last_success_s >= ttl_s


class _Keeper:
    """A lease and the thread that keeps it alive."""

    def __init__(self, client: KVClient, ttl_ms: int) -> None:
        from .client import KVClient

        self.ttl_s = ttl_ms / 1000
        every = self.ttl_s / 3
        # A client of its own, whose calls end within a keep-alive interval:
        # an answer after the lease's deadline is no use.
        self._client = KVClient(
            client.endpoints,
            timeout=max(min(client.timeout, every), 0.01),
            connect_timeout=max(min(client.connect_timeout, every), 0.01),
            retry_deadline=max(every, 0.02),
        )
        self.lease = client.lease_grant(ttl_ms)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-lease-{self.lease}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        every = self.ttl_s / 3
        last_ok = time.monotonic()
        while not self._stop.wait(every):
            sent = time.monotonic()
            gone = False
            try:
                self._client.lease_keepalive(self.lease)
                last_ok = sent
            except LeaseNotFoundError:
                gone = True
            except KVError:
                pass
            if judge_lost(gone, time.monotonic() - last_ok, self.ttl_s):
                self.lost.set()
                return

    def stop(self) -> None:
        self._stop.set()
        self._client.close()


class Lock:
    """A lock; a context manager (see :meth:`kvstore.client.KVClient.lock`).
    After it is taken: ``token`` (the fencing token), ``key``, ``lease``."""

    def __init__(self, client: KVClient, name: str, *, ttl_ms: int, wait_s: float | None) -> None:
        from .client import validate_key

        validate_key(name)
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms < 3:
            raise InvalidRequestError(f"a lock's ttl_ms must be an int >= 3, not {ttl_ms!r}")
        if wait_s is not None and wait_s < 0:
            raise InvalidRequestError("wait_s cannot be negative")
        self._client = client
        self.key = name
        self.ttl_ms = ttl_ms
        self.wait_s = wait_s
        self.token: int | None = None
        self.lease: int | None = None
        self._keeper: _Keeper | None = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def acquire(self) -> int:
        """Takes the lock; returns the fencing token."""
        started = time.monotonic()
        deadline = None if self.wait_s is None else started + self.wait_s
        keeper = _Keeper(self._client, self.ttl_ms)
        try:
            while True:
                if keeper.lost.is_set():
                    # Keep-alives failed for a whole TTL: the lease may be
                    # gone, and a lock taken with it lost at once.
                    keeper.stop()
                    keeper = _Keeper(self._client, self.ttl_ms)
                try:
                    token = self._try_create(keeper.lease)
                except LeaseNotFoundError:
                    # Our lease went while we waited: start over with a new one.
                    keeper.stop()
                    keeper = _Keeper(self._client, self.ttl_ms)
                    continue
                if token is not None:
                    self.token, self.lease, self._keeper = token, keeper.lease, keeper
                    return token
                if not self._wait_until_free(deadline):
                    raise LockTimeoutError(
                        f"lock {self.key!r} was not taken within {time.monotonic() - started:.3f} s"
                    )
        except BaseException:
            keeper.stop()
            try:
                self._client.lease_revoke(keeper.lease)
            except KVError:
                pass  # it expires within its TTL
            raise

    def _try_create(self, lease: int) -> int | None:
        try:
            return self._client.set(self.key, f"lease {lease}".encode(), if_absent=True, lease=lease)
        except PreconditionFailedError:
            return None
        except KVError as err:
            if not err.outcome_unknown:
                raise
            held = self._client.get_versioned(self.key, consistent=True)
            if held is not None and held.lease == lease:
                return held.mod_index
            return None

    def _wait_until_free(self, deadline: float | None) -> bool:
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            nap = POLL_INTERVAL_S if deadline is None else min(POLL_INTERVAL_S, deadline - now)
            time.sleep(max(nap, 0.0))
            try:
                if self._client.get_raw(self.key) is None:
                    return True
            except KVError as err:
                if not err.retryable:
                    raise

    def lost(self) -> bool:
        """Whether the lock is known lost (a keep-alive found the lease gone,
        or none succeeded for a whole TTL): stop using the token then."""
        return self._keeper is None or self._keeper.lost.is_set()

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Blocks until the lock is lost or ``timeout`` passes; whether lost."""
        if self._keeper is None:
            return True
        return self._keeper.lost.wait(timeout)

    def release(self) -> None:
        """Stops the keep-alives and revokes the lease (deleting the key); a
        lease already gone is no error."""
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        keeper.stop()
        try:
            self._client.lease_revoke(keeper.lease)
        except LeaseNotFoundError:
            pass
