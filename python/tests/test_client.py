"""KVClient against one real kvd: the basic operations, values, errors,
bulk writes, concurrency, and interop with the Rust CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from kvstore.client import KVClient
from kvstore.codec import Value
from kvstore.cluster import Node, free_port, start_node
from kvstore.errors import (
    ConnectError,
    InvalidKeyError,
    InvalidValueError,
    KVTimeoutError,
    ServerError,
)
from test_unit import ROUND_TRIP


def test_set_then_get(kv: KVClient) -> None:
    index = kv.set("greeting", "hello")
    assert index >= 1
    assert kv.get("greeting") == "hello"
    assert kv.get_raw("greeting") == b'"hello"'


def test_set_delete_get(kv: KVClient) -> None:
    kv.set("k", {"a": 1})
    assert kv.delete("k") is True
    assert kv.get("k") is None
    assert kv.get_raw("k") is None
    assert kv.delete("k") is False, "deleting an absent key succeeds and says so"


def test_get_without_set(kv: KVClient) -> None:
    assert kv.get("never-set") is None
    assert kv.get("never-set", "dflt") == "dflt"
    missing = object()
    assert kv.get("never-set", missing) is missing
    kv.set("null", None)
    assert kv.get("null", missing) is None, "a stored null is not 'absent'"


def test_set_twice_keeps_the_second(kv: KVClient) -> None:
    first = kv.set("k", "one")
    second = kv.set("k", ["two"])
    assert second > first
    assert kv.get("k") == ["two"]
    assert kv.status()["keys"] == 1


@pytest.mark.parametrize("value", ROUND_TRIP, ids=repr)
def test_every_value_type_round_trips(kv: KVClient, value: object) -> None:
    kv.set("v", value)  # type: ignore[arg-type]
    back = kv.get("v")
    assert back == value and type(back) is type(value)


def test_keys_with_awkward_characters_address_exactly_that_key(kv: KVClient) -> None:
    keys = ["a b", "users/42/name", "ünï/🔑", "q?x=1&y#z", "%41", "a/../b", "./x", "//lead//", "x" * 1024]
    for i, key in enumerate(keys):
        kv.set(key, i)
    for i, key in enumerate(keys):
        assert kv.get(key) == i, key
    assert kv.get("A") is None, "%41 was not decoded to A"
    assert kv.get("b") is None, "a/../b was not normalised to b"
    assert kv.status()["keys"] == len(keys)


def test_invalid_keys_and_values_fail_before_sending(kv: KVClient) -> None:
    for key in ["", ".", "..", "a\0", "x" * 1025]:
        with pytest.raises(InvalidKeyError):
            kv.set(key, 1)
        with pytest.raises(InvalidKeyError):
            kv.get(key)
    with pytest.raises(InvalidValueError):
        kv.set("k", {1, 2})  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        kv.bulk_set([("ok", 1), ("bad", float("nan"))])
    with pytest.raises(InvalidKeyError):
        kv.bulk_set([("ok", 1), ("", 2)])
    assert kv.status()["keys"] == 0, "a refused bulk sends nothing"


def test_server_errors_carry_the_servers_code(tmp_path: Path) -> None:
    with start_node(tmp_path / "small", extra_args=["--max-value-bytes", "1000"]) as n:
        kv = n.client()
        with pytest.raises(ServerError) as err:
            kv.set("big", b"x" * 1001)
        assert (err.value.code, err.value.status, err.value.retryable) == ("value_too_large", 413, False)
        assert err.value.endpoint == n.url
        with pytest.raises(ServerError) as err:
            kv.bulk_set([("a", 1), ("b", b"y" * 2000)])
        assert err.value.status == 413
        assert kv.get("a") is None, "a refused bulk wrote nothing"
        resp = kv.request("GET", "/no/such/route")
        assert resp.status == 404
        with pytest.raises(ServerError) as err:
            resp.raise_for_status()
        assert err.value.code == "not_found"


def test_bulk_set_then_gets(kv: KVClient) -> None:
    items: list[tuple[str, Value]] = [(f"bulk/{i}", {"i": i, "name": f"item {i}"}) for i in range(500)]
    items += [("bin", b"\x00\x01\xff"), ("text", "plain"), ("num", 7), ("raw-text", b"hello")]
    result = kv.bulk_set(items)
    assert result.count == len(items)
    for key, value in items:
        assert kv.get(key) == value, key
    # A mapping works too, and duplicates within one bulk: the last wins.
    kv.bulk_set({"m1": [1], "m2": None})
    kv.bulk_set([("dup", 1), ("dup", 2)])
    assert (kv.get("m1"), kv.get("m2", "absent"), kv.get("dup")) == ([1], None, 2)


def test_concurrent_bulk_sets_over_the_same_keys_never_mix(kv: KVClient) -> None:
    keys = [f"shared/{i}" for i in range(200)]
    writers, rounds = 4, 10
    errors: list[BaseException] = []

    def write(w: int) -> None:
        try:
            for r in range(rounds):
                kv.bulk_set([(k, {"writer": w, "round": r}) for k in keys])
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a writer never finished"
    assert not errors, errors
    values = [kv.get(k) for k in keys]
    # Each bulk is applied whole: the final state is one bulk's, not a mix.
    assert all(v == values[0] for v in values), {repr(v) for v in values}
    assert values[0]["round"] == rounds - 1


def test_connections_are_kept_alive(kv: KVClient) -> None:
    kv.set("a", 1)
    pool = kv._pool._idle[kv.current_endpoint]
    assert len(pool) == 1
    sock = pool[0].sock
    assert sock is not None
    local = sock.getsockname()
    for i in range(20):
        kv.get("a")
    assert len(pool) == 1 and pool[0].sock is not None
    assert pool[0].sock.getsockname() == local, "one TCP connection served every call"


def test_a_restarted_node_is_reconnected_transparently(node: Node, kv: KVClient) -> None:
    kv.set("a", 1)
    assert node.stop() == 0
    node.restart()
    assert kv.get("a") == 1  # the pooled connection is dead; a new one is made


def test_unreachable_endpoints_raise_connect_error(tmp_path: Path) -> None:
    kv = KVClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff_initial=0.01)
    with pytest.raises(ConnectError) as err:
        kv.get("a")
    assert err.value.retryable and err.value.code == "connect"


def test_retries_move_to_the_next_endpoint(node: Node) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    kv = KVClient([dead, node.url], backoff_initial=0.01)
    kv.set("a", "via the second endpoint")
    assert kv.current_endpoint == node.url
    assert kv.get("a") == "via the second endpoint"


def test_a_stopped_node_times_out_and_the_client_moves_on(tmp_path: Path) -> None:
    with start_node(tmp_path / "a") as stopped, start_node(tmp_path / "b") as live:
        stopped.signal(signal.SIGSTOP)
        try:
            with pytest.raises(KVTimeoutError) as err:
                KVClient(stopped.url, timeout=0.3, max_retries=0).get("k")
            assert err.value.retryable and err.value.endpoint == stopped.url
            # Long enough for a busy machine's fsync on the live node.
            kv = KVClient([stopped.url, live.url], timeout=2.0, backoff_initial=0.01)
            kv.set("k", "served by the live node")
            assert kv.current_endpoint == live.url
        finally:
            stopped.signal(signal.SIGCONT)


def test_aliases(kv: KVClient) -> None:
    kv.Set("k", "v")
    assert kv.Get("k") == "v"
    assert kv.BulkSet([("k2", 2)]).count == 1
    assert kv.Delete("k") is True
    assert kv.Get("k") is None


def test_values_interoperate_with_the_rust_cli(node: Node, kv: KVClient) -> None:
    cli = Path(os.environ["KVSTORE_BIN_DIR"]) / "kvclient"
    env = {**os.environ, "KV_ENDPOINTS": node.url}

    def run(*args: str) -> str:
        out = subprocess.run([str(cli), *args], env=env, capture_output=True, timeout=30, check=True)
        return out.stdout.decode()

    run("set", "from-cli", "hello")
    assert kv.get("from-cli") == b"hello", "plain text from other clients reads as bytes"
    run("set", "json-from-cli", '{"a": [1, 2]}')
    assert kv.get("json-from-cli") == {"a": [1, 2]}
    kv.set("from-python", "hi")
    kv.set("bytes-from-python", b"hi")
    assert run("get", "from-python").strip() == '"hi"'
    assert run("get", "bytes-from-python").strip() == "hi"
