"""Client logic that needs no server: value codec, key paths, endpoints,
redirect parsing, error decoding."""

from __future__ import annotations

import math

import pytest

from kvstore.client import (
    KVClient,
    Response,
    _parse_retry_after,
    _redirect_target,
    _server_error,
    key_path,
    normalize_endpoint,
)
from kvstore.codec import decode_value, encode_value
from kvstore.errors import (
    ConfigError,
    InvalidEndpointError,
    InvalidKeyError,
    InvalidValueError,
    ServerError,
    UnavailableError,
)

ROUND_TRIP = [
    "hi",
    "",
    "ünïcödé 🔑",
    "\ud800 lone surrogate",
    "42",
    "null",
    0,
    -(2**70),
    1.5,
    -0.0,
    1e300,
    True,
    False,
    None,
    [],
    [1, "a", None, [2.5]],
    {},
    {"name": "Ada", "tags": ["x"], "nested": {"n": None}},
    b"",
    b"raw\xff\x00",
    b"hello",
    b"not json {",
]


@pytest.mark.parametrize("value", ROUND_TRIP, ids=repr)
def test_codec_round_trips(value: object) -> None:
    back = decode_value(encode_value(value))
    assert back == value and type(back) is type(value)


def test_codec_stores_bytes_raw_and_the_rest_as_compact_json() -> None:
    assert encode_value(b"\x00\xff") == b"\x00\xff"
    assert encode_value(bytearray(b"ab")) == b"ab"
    assert encode_value(memoryview(b"ab")) == b"ab"
    assert encode_value("hi") == b'"hi"'
    assert encode_value("é") == '"é"'.encode()
    assert encode_value({"a": [1, True, None]}) == b'{"a":[1,true,null]}'
    assert encode_value((1, 2)) == b"[1,2]"
    assert decode_value(encode_value((1, 2))) == [1, 2]


def test_codec_reads_values_of_other_clients() -> None:
    # Plain text written by `kvclient set k hello` is not JSON: bytes back.
    assert decode_value(b"hello") == b"hello"
    # JSON written by anyone, whitespace and all, decodes.
    assert decode_value(b' {"a" : [1, 2]}\n') == {"a": [1, 2]}
    # Not JSON (Python's parser would accept these constants): bytes back.
    for raw in (b"NaN", b"Infinity", b"-Infinity", b"[NaN]"):
        assert decode_value(raw) == raw
    assert decode_value(b"\xff\xfe") == b"\xff\xfe"


@pytest.mark.parametrize(
    "value",
    [{1: "a"}, {"a": {None: 1}}, {1, 2}, object(), math.nan, math.inf, [-math.inf], 1j],
    ids=repr,
)
def test_codec_refuses_what_does_not_round_trip(value: object) -> None:
    with pytest.raises(InvalidValueError) as err:
        encode_value(value)
    assert err.value.code == "invalid_value"
    assert isinstance(err.value, TypeError)


def test_codec_refuses_absurd_nesting() -> None:
    deep: list[object] = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(InvalidValueError):
        encode_value(deep)


def test_key_paths_encode_exactly() -> None:
    assert key_path("users/42") == "/v1/kv/users/42"
    assert key_path("a b") == "/v1/kv/a%20b"
    assert key_path("q?#&=+%") == "/v1/kv/q%3F%23%26%3D%2B%25"
    assert key_path("é") == "/v1/kv/%C3%A9"
    assert key_path("a/../b") == "/v1/kv/a%2F..%2Fb"
    assert key_path("./x") == "/v1/kv/.%2Fx"
    assert key_path("a/..b/c.") == "/v1/kv/a/..b/c."


@pytest.mark.parametrize("key", ["", ".", "..", "a\0b", "x" * 1025, "é" * 513, "\udc80"])
def test_bad_keys_are_refused_before_sending(key: str) -> None:
    with pytest.raises(InvalidKeyError) as err:
        key_path(key)
    assert err.value.code == "invalid_key"


def test_endpoints_are_normalised() -> None:
    assert normalize_endpoint("127.0.0.1:8765") == "http://127.0.0.1:8765"
    assert normalize_endpoint(" http://Node0:8765/ ") == "http://node0:8765"
    assert normalize_endpoint("http://h:1/prefix/") == "http://h:1/prefix"
    for bad in ["", "ws://h:1", "http://", "http://h:1/?x=1", "ftp://h", "http://h:99999"]:
        with pytest.raises(InvalidEndpointError):
            normalize_endpoint(bad)


def test_client_configuration_is_checked() -> None:
    c = KVClient("127.0.0.1:1, http://127.0.0.1:2,,127.0.0.1:1")
    assert c.endpoints == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert KVClient(["127.0.0.1:3"]).current_endpoint == "http://127.0.0.1:3"
    with pytest.raises(ConfigError):
        KVClient([])
    with pytest.raises(ConfigError):
        KVClient(" , ")
    with pytest.raises(ConfigError):
        KVClient("127.0.0.1:1", timeout=0)
    with pytest.raises(ConfigError):
        KVClient("127.0.0.1:1", retry_deadline=-1)


def test_redirect_prefers_primary_header_then_location() -> None:
    h = {"x-kv-primary": "http://127.0.0.1:8766", "location": "http://127.0.0.1:9999/v1/kv/a"}
    assert _redirect_target(h, "/v1/kv/a") == "http://127.0.0.1:8766"
    h = {"location": "http://10.0.0.2:8766/kv/v1/kv/a%20b"}
    assert _redirect_target(h, "/v1/kv/a%20b") == "http://10.0.0.2:8766/kv"
    h = {"location": "http://10.0.0.2:8766/v1/kv/rewritten"}
    assert _redirect_target(h, "/v1/kv/a%20b") == "http://10.0.0.2:8766"
    assert _redirect_target({"x-kv-primary": "", "location": "/v1/kv/a"}, "/v1/kv/a") is None
    assert _redirect_target({}, "/v1/kv/a") is None


def test_retry_after_seconds() -> None:
    assert _parse_retry_after({"retry-after": "2"}) == 2.0
    assert _parse_retry_after({"retry-after": "0.25"}) == 0.25
    assert _parse_retry_after({"retry-after": "-1"}) is None
    assert _parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert _parse_retry_after({}) is None
    assert _parse_retry_after({"x-kv-retry-after-ms": "250", "retry-after": "1"}) == 0.25


def test_only_refusals_that_wrote_nothing_count_as_not_applied() -> None:
    for code, expected in [
        ("writes_paused", True),
        ("transfer_in_progress", True),
        ("no_primary", True),
        ("overloaded", True),
        ("commit_timeout", False),
        ("http_503", False),
    ]:
        err = _server_error(
            Response("http://n0", 503, {}, b'{"error":{"code":"%s","message":"m"}}' % code.encode())
        )
        assert err.was_not_applied is expected, code


def test_server_errors_decode_json_and_other_bodies() -> None:
    body = b'{"error":{"code":"value_too_large","message":"value is 5 MiB,\\nlimit 4 MiB"}}'
    err = _server_error(Response("http://n0", 413, {}, body))
    assert type(err) is ServerError
    assert (err.code, err.status, err.retryable) == ("value_too_large", 413, False)
    assert str(err) == "http://n0 answered 413: value is 5 MiB, limit 4 MiB (value_too_large)"
    err = _server_error(Response("http://n0", 503, {"retry-after": "1"}, b"paused\n"))
    assert isinstance(err, UnavailableError)
    assert (err.code, err.retryable, err.retry_after) == ("http_503", True, 1.0)
    assert "paused" in str(err)
    assert "Bad Gateway" in str(_server_error(Response("http://n0", 502, {}, b"")))
    assert len(str(_server_error(Response("http://n0", 500, {}, b"x" * 5000)))) < 400


def test_default_endpoints_come_from_kv_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KV_ENDPOINTS", raising=False)
    assert KVClient().endpoints == ["http://127.0.0.1:8765"]
    monkeypatch.setenv("KV_ENDPOINTS", "127.0.0.1:1,127.0.0.1:2")
    assert KVClient().endpoints == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
