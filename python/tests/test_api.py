"""KVClient against a real kvd: versions, ranges that page, counts,
conditional writes, a compare-and-swap loop from several threads, prefix
deletes and transactions (docs/DESIGN.md §2.10-§2.13); in masterless mode,
that compares are refused and ranges work."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
from conftest import StartThree

from kvstore.client import Item, KVClient
from kvstore.cluster import start_node, wait_until
from kvstore.errors import Current, KVTimeoutError, PreconditionFailedError, ServerError


def test_versions_follow_puts_and_start_over_after_a_delete(kv: KVClient) -> None:
    assert kv.get_versioned("k") is None
    first = kv.set("k", "one")
    second = kv.set("k", {"two": 2})
    v = kv.get_versioned("k")
    assert v is not None
    assert (v.create_index, v.mod_index, v.version) == (first, second, 2)
    assert v.value == {"two": 2} and v.raw == b'{"two":2}'
    assert v.etag == f'"{second}"'
    consistent = kv.get_versioned("k", consistent=True)
    assert consistent == v
    kv.delete("k")
    third = kv.set("k", "again")
    v = kv.get_versioned("k")
    assert v is not None
    assert (v.create_index, v.mod_index, v.version) == (third, third, 1), "a delete forgets"


def test_list_pages_through_every_key_once_in_order(kv: KVClient) -> None:
    keys = [f"p/{i:03}" for i in range(250)]
    bulk_index = kv.bulk_set([(k, {"n": i}) for i, k in enumerate(keys)]).index
    kv.bulk_set([("o/outside", 1), ("q/outside", 2), ("p", "the prefix itself")])

    items = list(kv.list("p/", page_size=7))  # 36 pages
    assert [i.key for i in items] == keys
    assert [i.value for i in items] == [{"n": n} for n in range(250)]
    assert all(i.create_index == i.mod_index == bulk_index and i.version == 1 for i in items)

    only_keys = list(kv.list("p/", keys_only=True, page_size=100))
    assert [i.key for i in only_keys] == keys
    assert all(i.raw is None for i in only_keys)

    assert [i.key for i in kv.range("p/010", "p/020", page_size=3)] == keys[10:20]
    assert [i.key for i in kv.range(end="p")] == ["o/outside"]
    assert [i.key for i in kv.range("p/249")] == ["p/249", "q/outside"]
    assert len(list(kv.list())) == 253, "the empty prefix is every key"
    assert kv.count("p/") == 250
    assert kv.count(start="p/100", end="p/200") == 100
    assert kv.count() == 253
    assert list(kv.list("nothing/")) == []


def test_binary_and_text_values_list_as_they_were_stored(kv: KVClient) -> None:
    kv.set("v/bin", b"\x00\xff")
    kv.set("v/text", b"plain")
    kv.set("v/json", [1, 2])
    got = {i.key: i for i in kv.list("v/")}
    assert got["v/bin"].raw == b"\x00\xff"
    assert got["v/text"].raw == b"plain" and got["v/text"].value == b"plain"
    assert got["v/json"].value == [1, 2]
    assert isinstance(got["v/json"], Item)


def test_if_absent_creates_once(kv: KVClient) -> None:
    index = kv.set("lock", "me", if_absent=True)
    with pytest.raises(PreconditionFailedError) as err:
        kv.set("lock", "you", if_absent=True)
    assert err.value.current == Current(True, index, index, 1)
    assert not err.value.outcome_unknown
    assert kv.get("lock") == "me", "the refused write changed nothing"


def test_if_version_writes_only_over_that_version(kv: KVClient) -> None:
    first = kv.set("k", 1)
    second = kv.set("k", 2, if_version=first)
    with pytest.raises(PreconditionFailedError) as err:
        kv.set("k", 3, if_version=first)
    assert (err.value.current.mod_index, err.value.current.version) == (second, 2)
    assert err.value.status == 412
    with pytest.raises(PreconditionFailedError) as err:
        kv.set("absent", 1, if_version=first)
    assert err.value.current == Current(False)
    with pytest.raises(PreconditionFailedError):
        kv.delete("k", if_version=first)
    assert kv.get("k") == 2
    assert kv.delete("k", if_version=second) is True
    assert kv.get_raw("k") is None


def test_a_cas_loop_from_several_threads_loses_no_increment(kv: KVClient) -> None:
    threads, per_thread = 4, 15
    conflicts = [0]
    lock = threading.Lock()

    def increment() -> None:
        while True:
            v = kv.get_versioned("counter")
            try:
                if v is None:
                    kv.set("counter", 1, if_absent=True)
                else:
                    kv.set("counter", v.value + 1, if_version=v.mod_index)
                return
            except PreconditionFailedError:
                with lock:
                    conflicts[0] += 1

    def worker() -> None:
        for _ in range(per_thread):
            increment()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    assert not any(t.is_alive() for t in workers)
    assert kv.get("counter") == threads * per_thread
    v = kv.get_versioned("counter")
    assert v is not None and v.version == threads * per_thread


def test_a_conditional_write_is_not_retried_after_an_unknown_outcome(tmp_path: Path) -> None:
    with start_node(tmp_path / "a") as stuck, start_node(tmp_path / "b") as live:
        kv = KVClient([stuck.url, live.url], timeout=0.3, backoff_initial=0.01)
        stuck.signal(signal.SIGSTOP)
        try:
            # The request sits in the stopped node's socket and may yet be
            # served: the outcome is unknown, so no retry on the live node.
            with pytest.raises(KVTimeoutError) as err:
                kv.set("k", "once", if_absent=True)
            assert err.value.outcome_unknown and err.value.endpoint == stuck.url
            assert live.client().get_raw("k") is None, "not retried on the live node"
            with pytest.raises(KVTimeoutError):
                kv.txn(
                    compare=[{"key": "k", "target": "exists", "op": "==", "value": False}],
                    success=[{"put": {"key": "k", "value": "once"}}],
                )
            assert live.client().get_raw("k") is None
            # A plain write is retried there.
            kv.set("k", "plain")
            assert live.client().get("k") == "plain"
        finally:
            stuck.signal(signal.SIGCONT)


def test_delete_prefix_removes_exactly_that_prefix(kv: KVClient) -> None:
    kv.bulk_set([(f"a/{i}", i) for i in range(5)] + [("a", "root"), ("b/1", 1), ("a0", 0)])
    assert kv.delete_prefix("a/") == 5
    assert kv.count("a/") == 0
    assert sorted(i.key for i in kv.list()) == ["a", "a0", "b/1"]
    assert kv.delete_prefix("a/") == 0, "nothing left under it"


def test_txn_runs_one_branch_and_reads_its_own_writes(kv: KVClient) -> None:
    index = kv.set("a", "old")
    kv.set("b", b"\xff\x00")
    answer = kv.txn(
        compare=[{"key": "a", "target": "mod_index", "op": "==", "value": index}],
        success=[
            {"put": {"key": "a", "value": "new"}},
            {"get": {"key": "a"}},
            {"get": {"key": "b"}},
            {"get": {"key": "missing"}},
            {"range": {"prefix": "", "keys_only": True}},
        ],
        failure=[{"get": {"key": "a"}}],
    )
    assert answer["succeeded"] is True
    results = answer["results"]
    assert results[0] == {"put": {"mod_index": answer["index"]}}
    assert results[1]["get"]["value"] == "new", "a read sees the writes before it"
    assert results[2]["get"]["value"] == {"base64": "/wA="}, "not UTF-8: base64"
    assert results[3] == {"get": None}
    assert [i["key"] for i in results[4]["range"]["items"]] == ["a", "b"]
    assert kv.get("a") == b"new"

    # The same compare again fails: the failure branch runs, nothing written.
    answer = kv.txn(
        compare=[{"key": "a", "target": "mod_index", "op": "==", "value": index}],
        success=[{"delete": {"key": "a"}}],
        failure=[{"get": {"key": "a"}}],
    )
    assert answer["succeeded"] is False
    assert answer["results"][0]["get"]["value"] == "new"
    assert kv.get("a") == b"new"
    # Without compares, the success branch always runs.
    answer = kv.txn(success=[{"delete_prefix": {"prefix": "a"}}])
    assert answer["succeeded"] is True and answer["results"] == [{"delete_prefix": {"deleted": 1}}]


def test_a_bad_txn_is_refused_and_writes_nothing(kv: KVClient) -> None:
    kv.set("k", 1)
    before = kv.status()["digest"]
    with pytest.raises(ServerError) as err:
        kv.txn(
            compare=[{"key": "k", "target": "colour", "op": "==", "value": 1}],
            success=[{"put": {"key": "k", "value": "2"}}],
        )
    assert (err.value.status, err.value.code) == (400, "invalid_txn")
    with pytest.raises(ServerError) as err:
        kv.txn(success=[{"get": {"key": "k"}}] * 129)
    assert (err.value.status, err.value.code) == (413, "too_many_ops")
    assert kv.status()["digest"] == before


def test_masterless_refuses_compares_and_serves_ranges(start_three: StartThree) -> None:
    nodes = start_three(mode="masterless")
    kv = KVClient(nodes[0].url)
    kv.bulk_set([(f"m/{i}", i) for i in range(5)])
    with pytest.raises(ServerError) as err:
        kv.set("m/0", "x", if_version=1)
    assert (err.value.status, err.value.code) == (409, "unsupported_in_masterless")
    with pytest.raises(ServerError) as err:
        kv.txn(compare=[{"key": "m/0", "target": "exists", "op": "==", "value": True}])
    assert err.value.code == "unsupported_in_masterless"
    assert kv.get("m/0") == 0
    other = KVClient(nodes[1].url)
    wait_until(lambda: other.count("m/") == 5, 15, "the bulk on n1")
    assert [i.key for i in other.list("m/", page_size=2)] == [f"m/{i}" for i in range(5)]
