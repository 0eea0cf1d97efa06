"""What survives what, through KVClient: graceful exit, SIGKILL in the middle
of bulk writes, and debug_flaky (durable but not applied) then restart."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvstore.client import KVClient
from kvstore.cluster import Node, start_node, wait_until
from kvstore.errors import KVError, ServerError


def test_set_graceful_exit_get(node: Node, kv: KVClient) -> None:
    for i in range(200):
        kv.set(f"k{i}", {"i": i})
    kv.delete("k0")
    assert node.stop() == 0, "SIGTERM exits cleanly"
    node.restart()
    assert kv.get("k0") is None
    assert [kv.get(f"k{i}") for i in range(1, 200)] == [{"i": i} for i in range(1, 200)]


def test_bulk_set_then_sigkill_is_all_or_nothing(node: Node) -> None:
    per_bulk = 100
    filler = "x" * 1000  # ~100 KiB per bulk: kills land inside WAL writes too
    acked: list[int] = []
    attempted = [-1]
    stop = threading.Event()

    def writer() -> None:
        # Its own client, without retries, so it stops at the first failure.
        kv = KVClient(node.url, max_retries=0, timeout=5)
        i = 0
        while not stop.is_set():
            attempted[0] = i
            try:
                kv.bulk_set([(f"b{i}/{j}", {"bulk": i, "j": j, "pad": filler}) for j in range(per_bulk)])
            except KVError:
                return
            acked.append(i)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_until(lambda: len(acked) >= 5, 30, "five acknowledged bulks")
        node.kill()
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive(), "the writer never finished"
    node.restart()
    kv = node.client()
    for i in range(attempted[0] + 2):
        present = sum(kv.get_raw(f"b{i}/{j}") is not None for j in range(per_bulk))
        assert present in (0, per_bulk), f"bulk {i}: {present} of {per_bulk} keys survived"
        if i in acked:
            assert present == per_bulk, f"acknowledged bulk {i} lost"
            assert kv.get(f"b{i}/{per_bulk - 1}") == {"bulk": i, "j": per_bulk - 1, "pad": filler}


def test_debug_flaky_write_is_recovered_by_a_restart(node: Node, kv: KVClient) -> None:
    # With P = 1.0 the write is made durable but not applied in memory, as if
    # the node crashed between log and apply; the restart's replay applies it.
    assert kv.set("flaky", "durable", debug_flaky=1.0) >= 1
    assert kv.bulk_set([("fb1", 1), ("fb2", b"\x00\x01")], debug_flaky=1.0).count == 2
    assert kv.get("flaky") is None and kv.get("fb1") is None, "not applied before the restart"
    node.kill()
    node.restart()
    assert kv.get("flaky") == "durable"
    assert (kv.get("fb1"), kv.get("fb2")) == (1, b"\x00\x01")
    # P = 0.0 applies as usual.
    kv.set("steady", 1, debug_flaky=0.0)
    kv.bulk_set({"steady2": 2}, debug_flaky=0.0)
    assert (kv.get("steady"), kv.get("steady2")) == (1, 2)


def test_debug_flaky_is_refused_without_enable_debug(tmp_path: Path) -> None:
    with start_node(tmp_path / "plain") as n:
        kv = n.client()
        with pytest.raises(ServerError) as err:
            kv.set("k", b"v", debug_flaky=1.0)
        assert (err.value.status, err.value.code) == (400, "debug_disabled")
        with pytest.raises(ServerError) as err:
            kv.bulk_set([("b", "1")], debug_flaky=1.0)
        assert (err.value.status, err.value.code) == (400, "debug_disabled")
        # Refused means nothing written: not in memory, not in the log (a
        # restart would replay it).
        assert kv.get_raw("k") is None and kv.get_raw("b") is None
        assert kv.status()["last_index"] == 0
        n.kill()
        n.restart()
        assert kv.get_raw("k") is None and kv.get_raw("b") is None
