"""TTL, leases, locks and watch (docs/DESIGN.md §2.15-§2.17, §9.3): the
pure parts (the resume rule, argument checks, error mapping) without a
server, then the client against real kvd processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvstore.client import KVClient, Response, _expiry_params, _server_error
from kvstore.cluster import start_node, wait_until
from kvstore.errors import (
    CompactedError,
    InvalidRequestError,
    LeaseNotFoundError,
    LockTimeoutError,
    ServerError,
)
from kvstore.lock import judge_lost
from kvstore.watch import Skipper, _target_params, after_event, after_progress

# -- without a server ---------------------------------------------------------


def test_the_position_moves_with_each_event_and_progress() -> None:
    p = after_event((10, 0), 10)
    assert p == (10, 1)
    p = after_event(p, 10)
    assert p == (10, 2)
    p = after_event(p, 14)
    assert p == (14, 1)
    assert after_progress(p, 14) == (15, 0)
    assert after_progress(p, 13) is None, "behind what was delivered"
    assert after_progress((15, 0), 14) == (15, 0)
    assert after_progress((15, 0), 20) == (21, 0)


def delivered(start: tuple[int, int], stream: list[int]) -> list[int]:
    skipper = Skipper(start)
    return [i for i in stream if skipper.admit(i)]


def test_a_resume_drops_exactly_the_events_seen_of_its_first_record() -> None:
    assert delivered((7, 2), [7, 7, 7, 8, 9]) == [7, 8, 9]
    assert delivered((7, 3), [7, 7, 7, 8]) == [8]
    assert delivered((8, 0), [8, 8, 9]) == [8, 8, 9]
    assert delivered((8, 0), [6, 7, 8]) == [8], "an earlier record is not believed"


def test_a_break_anywhere_loses_and_repeats_nothing() -> None:
    log = [3, 3, 3, 4, 6, 6, 7]
    for cut in range(len(log) + 1):
        pos = (3, 0)
        got: list[int] = []
        first = Skipper(pos)
        for i in log[:cut]:
            if first.admit(i):
                got.append(i)
                pos = after_event(pos, i)
        rest = [i for i in log if i >= pos[0]]
        got += delivered(pos, rest)
        assert got == log, f"cut after {cut} events"


def test_expiry_arguments_are_checked_before_sending() -> None:
    assert _expiry_params(1500, None, False) == {"ttl_ms": "1500"}
    assert _expiry_params(None, 42, False) == {"lease": "42"}
    assert _expiry_params(None, None, True) == {"keep_ttl": "true"}
    assert _expiry_params(None, None, False) == {}
    bad_calls: list[Callable[[], object]] = [
        lambda: _expiry_params(0, None, False),
        lambda: _expiry_params(315_360_000_001, None, False),
        lambda: _expiry_params(True, None, False),
        lambda: _expiry_params(5, 1, False),
        lambda: _expiry_params(None, 1, True),
        lambda: _expiry_params(None, -1, False),
    ]
    for bad in bad_calls:
        with pytest.raises(InvalidRequestError):
            bad()


def test_watch_targets_are_checked_as_the_node_does() -> None:
    def check(key: str) -> None:
        if not key:
            raise InvalidRequestError("empty")

    assert _target_params("p/", None, None, None, check) == {"prefix": "p/"}
    assert _target_params(None, "k", None, None, check) == {"key": "k"}
    assert _target_params(None, None, "a", None, check) == {"start": "a"}
    assert _target_params(None, None, None, None, check) == {}
    for args in [("p", "k", None, None), ("p", None, "a", None), (None, None, "b", "a")]:
        with pytest.raises(InvalidRequestError):
            _target_params(*args, check)


def test_dead_leases_and_compacted_watches_are_typed_errors() -> None:
    def answer(status: int, body: str) -> Response:
        return Response("http://n0", status, {}, body.encode())

    err = _server_error(answer(404, '{"error":{"code":"lease_not_found","message":"gone"}}'))
    assert isinstance(err, LeaseNotFoundError) and err.code == "lease_not_found"
    err = _server_error(
        answer(410, '{"error":{"code":"compacted","message":"m"},"oldest_index":40}')
    )
    assert isinstance(err, CompactedError) and err.oldest_index == 40
    err = _server_error(answer(404, '{"error":{"code":"not_found","message":"m"}}'))
    assert type(err) is ServerError


def test_a_lock_is_lost_when_its_lease_is_gone_or_unrenewed_for_a_ttl() -> None:
    assert not judge_lost(False, 3.0, 9.0)
    assert judge_lost(False, 9.0, 9.0)
    assert judge_lost(True, 0.0, 9.0)


# -- against kvd --------------------------------------------------------------


def test_a_key_with_a_ttl_reports_its_time_left_and_goes(kv: KVClient) -> None:
    kv.set("t/short", "v", ttl_ms=400)
    kv.set("t/long", "v", ttl_ms=600_000)
    kv.set("t/plain", "v")
    long = kv.get_versioned("t/long")
    assert long is not None and long.ttl_ms is not None and 0 < long.ttl_ms <= 600_000
    assert long.lease is None
    plain = kv.get_versioned("t/plain")
    assert plain is not None and plain.ttl_ms is None
    wait_until(lambda: kv.get("t/short") is None, timeout=10, what="t/short to expire")
    # keep_ttl keeps the deadline; a plain put clears it.
    kv.set("t/long", "w", keep_ttl=True)
    kept = kv.get_versioned("t/long")
    assert kept is not None and kept.ttl_ms is not None and kept.value == "w"
    kv.set("t/long", "x")
    cleared = kv.get_versioned("t/long")
    assert cleared is not None and cleared.ttl_ms is None


def test_leases_grant_show_keep_alive_and_revoke_with_their_keys(kv: KVClient) -> None:
    lease = kv.lease_grant(60_000)
    kv.set("l/a", 1, lease=lease)
    kv.set("l/b", 2, lease=lease)
    held = kv.get_versioned("l/a")
    assert held is not None and held.lease == lease
    info = kv.lease_info(lease)
    assert info is not None and info["keys"] == ["l/a", "l/b"] and info["more"] is False
    assert kv.lease_keepalive(lease)["id"] == lease
    assert kv.lease_revoke(lease) == 2
    assert kv.get("l/a") is None and kv.get("l/b") is None
    assert kv.lease_info(lease) is None
    with pytest.raises(LeaseNotFoundError):
        kv.lease_keepalive(lease)
    with pytest.raises(LeaseNotFoundError):
        kv.set("l/c", 3, lease=lease)
    assert kv.get("l/c") is None, "nothing written for a dead lease"


def test_a_contender_waits_for_the_holder_and_gets_a_larger_token(kv: KVClient) -> None:
    order: list[str] = []
    with kv.lock("locks/a", ttl_ms=3000) as first:
        assert first.token is not None and first.lease is not None
        held = kv.get_versioned("locks/a")
        assert held is not None and held.mod_index == first.token and held.lease == first.lease
        with pytest.raises(LockTimeoutError):
            with kv.lock("locks/a", wait_s=0.3):
                pass
        tokens: list[int] = []

        def contend() -> None:
            with KVClient(kv.endpoints) as other, other.lock("locks/a", ttl_ms=3000, wait_s=30) as second:
                order.append("second")
                assert second.token is not None
                tokens.append(second.token)

        thread = threading.Thread(target=contend)
        thread.start()
        time.sleep(0.3)
        assert not order, "the second took a held lock"
        order.append("first released")
    thread.join(30)
    assert order == ["first released", "second"]
    assert tokens and tokens[0] > first.token


def test_lost_fires_when_the_lease_is_revoked_behind_the_holders_back(kv: KVClient) -> None:
    with kv.lock("locks/b", ttl_ms=900) as held:
        assert not held.lost()
        assert held.lease is not None
        kv.lease_revoke(held.lease)
        assert held.wait_lost(10), "lost() did not fire"
        assert held.lost()


def collect(watch: Any, n: int, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The next ``n`` events ``keep`` takes, within 30 s in all (progress
    events keep coming, so the bound is on the whole wait)."""
    deadline = time.monotonic() + 30
    out: list[dict[str, Any]] = []
    for event in watch:
        assert time.monotonic() < deadline, f"{len(out)} of {n} events in time: {out}"
        if keep(event):
            out.append(event)
            if len(out) == n:
                break
    return out


def not_progress(event: dict[str, Any]) -> bool:
    return bool(event["type"] != "progress")


def test_watch_streams_puts_deletes_and_expiries_in_order(kv: KVClient) -> None:
    first = kv.set("w/a", "1")
    kv.set("w/b", "2", ttl_ms=300)
    kv.delete("w/a")
    kv.set("other", "x")
    with kv.watch("w/", from_index=first, prev_value=True) as watch:
        events = collect(watch, 4, not_progress)
    assert [(e["type"], e["key"]) for e in events] == [
        ("put", "w/a"),
        ("put", "w/b"),
        ("delete", "w/a"),
        ("expire", "w/b"),
    ]
    assert events[0]["value"] == '"1"' and events[0]["index"] == first
    assert events[2]["prev_value"] == '"1"'
    indexes = [e["index"] for e in events]
    assert indexes == sorted(indexes)


def test_watch_resumes_across_a_restart_with_no_gap_and_no_duplicate(tmp_path: Path) -> None:
    node = start_node(tmp_path / "n0")
    try:
        with KVClient(node.url, retry_deadline=30) as kv:
            start = kv.set("r/0", 0)
            watch = kv.watch("r/", from_index=start, progress_ms=200, reconnect_s=60)
            got = collect(watch, 1, not_progress)
            # One record with three events, so the break falls inside it.
            kv.bulk_set([("r/1", 1), ("r/2", 2), ("r/3", 3)])
            got += collect(watch, 2, not_progress)
            node.stop()
            node.restart()
            for i in range(4, 8):
                kv.set(f"r/{i}", i)
            got += collect(watch, 5, not_progress)
            watch.close()
        assert [e["key"] for e in got] == [f"r/{i}" for i in range(8)]
    finally:
        node.close()


def test_a_watch_from_an_index_no_longer_held_is_compacted(tmp_path: Path) -> None:
    with start_node(tmp_path / "n0", extra_args=["--watch-cache-mib", "1"]) as node:
        with KVClient(node.url) as kv:
            big = b"x" * (300 << 10)
            for i in range(8):
                kv.set(f"c/{i}", big)
            with pytest.raises(CompactedError) as caught:
                next(iter(kv.watch("c/", from_index=1)))
            assert caught.value.oldest_index > 1

