"""The pure parts of versions, ranges, conditional writes and transactions:
request headers and queries, answer decoding, which failures leave a write's
outcome unknown. No server; the same behaviour against a real kvd is in
test_api.py."""

from __future__ import annotations

import pytest

from kvstore.client import (
    Item,
    KVClient,
    Response,
    _flaky_query,
    _page,
    _precondition,
    _range_path,
    _server_error,
    _span,
    _versioned,
    _wire_bytes,
)
from kvstore.errors import (
    NOT_WRITTEN_CODES,
    ConnectError,
    Current,
    DecodeError,
    InvalidRequestError,
    KVTimeoutError,
    PreconditionFailedError,
    ServerError,
    TransportError,
)


def test_preconditions_become_their_headers() -> None:
    assert _precondition(None, False) == {}
    assert _precondition(9, False) == {"If-Match": '"9"'}
    assert _precondition(0, False) == {"If-Match": '"0"'}
    assert _precondition(None, True) == {"If-None-Match": "*"}
    for bad in (-1, True, 1.5, "9"):
        with pytest.raises(InvalidRequestError):
            _precondition(bad, False)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        _precondition(3, True)


def test_debug_flaky_is_a_probability() -> None:
    assert _flaky_query(None) == ""
    assert _flaky_query(0.5) == "?debug_flaky=0.5"
    assert _flaky_query(1) == "?debug_flaky=1.0"
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidRequestError):
            _flaky_query(bad)


def test_range_queries_encode_every_value() -> None:
    assert _range_path({"prefix": "users/"}) == "/v1/kv?prefix=users%2F"
    path = _range_path({**_span("a b", "m&n"), "limit": "5"})
    assert path == "/v1/kv?start=a%20b&end=m%26n&limit=5"
    assert _span(None, "z") == {"end": "z"}
    assert _span("a", "a") == {"start": "a", "end": "a"}
    with pytest.raises(InvalidRequestError):
        _span("b", "a")
    # Code point order is UTF-8 byte order: "é" (C3 A9) sorts after "z".
    with pytest.raises(InvalidRequestError):
        _span("é", "z")


def test_bad_ranges_are_refused_before_sending() -> None:
    kv = KVClient("127.0.0.1:1")  # nothing listens: any request would fail
    for page_size in (0, 10_001):
        with pytest.raises(InvalidRequestError):
            kv.list("p", page_size=page_size)
    with pytest.raises(InvalidRequestError):
        kv.range("b", "a")
    with pytest.raises(InvalidRequestError):
        kv.count("p", start="a")
    with pytest.raises(InvalidRequestError):
        kv.delete_prefix("")
    with pytest.raises(InvalidRequestError):
        kv.set("k", 1, if_version=1, if_absent=True)
    with pytest.raises(InvalidRequestError):
        kv.set("k", 1, if_absent=True, debug_flaky=0.5)
    with pytest.raises(InvalidRequestError, match="1025 bytes"):
        kv.count("k" * 1025)
    with pytest.raises(InvalidRequestError, match="1026 bytes"):
        kv.count(start="é" * 513)
    with pytest.raises(InvalidRequestError):
        kv.list("k" * 1025)


def test_pages_decode_text_binary_and_keys_only_items() -> None:
    doc = {
        "items": [
            {"key": "a/1", "value": '{"n":1}', "create_index": 3, "mod_index": 9, "version": 2},
            {"key": "a/2", "value": {"base64": "/wA="}, "create_index": 4, "mod_index": 4,
             "version": 1},
            {"key": "a/3", "create_index": 5, "mod_index": 5, "version": 1},
        ],
        "count": 3,
        "index": 42,
        "next_page_token": "AQ",
    }
    items, token = _page(doc, "http://n0")
    assert token == "AQ"
    assert items[0] == Item("a/1", b'{"n":1}', 3, 9, 2)
    assert items[0].value == {"n": 1}, "decoded by the codec rule"
    assert items[1].raw == b"\xff\x00" and items[1].value == b"\xff\x00"
    assert items[2].raw is None and items[2].value is None
    assert _page({"items": [], "count": 0, "index": 7}, "http://n0") == ([], None)
    bad_pages: list[object] = [
        {"items": [{"key": "k"}]},
        {"items": 3},
        {"items": [], "next_page_token": 5},
        [],
    ]
    for bad in bad_pages:
        with pytest.raises(DecodeError):
            _page(bad, "http://n0")


def test_wire_values_are_strings_or_base64() -> None:
    assert _wire_bytes("é") == "é".encode()
    assert _wire_bytes({"base64": "AAE="}) == b"\x00\x01"
    for bad in (1, None, {"base64": "!!"}, {"base64": "AA==", "x": 1}, {"b64": "AA=="}):
        with pytest.raises(ValueError):
            _wire_bytes(bad)


def test_versions_come_from_the_headers() -> None:
    headers = {"etag": '"9"', "x-kv-mod-index": "9", "x-kv-create-index": "3", "x-kv-version": "2"}
    v = _versioned(Response("http://n0", 200, headers, b'"hi"'))
    assert (v.create_index, v.mod_index, v.version, v.etag) == (3, 9, 2, '"9"')
    assert v.raw == b'"hi"' and v.value == "hi"
    del headers["x-kv-version"]
    with pytest.raises(DecodeError, match="X-KV-Version"):
        _versioned(Response("http://n0", 200, headers, b""))


def test_a_412_with_the_keys_state_is_a_failed_precondition() -> None:
    body = (
        b'{"error":{"code":"precondition_failed","message":"mod_index is 9"},'
        b'"current":{"exists":true,"create_index":3,"mod_index":9,"version":2}}'
    )
    err = _server_error(Response("http://n0", 412, {"etag": '"9"'}, body))
    assert isinstance(err, PreconditionFailedError)
    assert err.current == Current(True, 3, 9, 2)
    assert (err.code, err.status, err.retryable) == ("precondition_failed", 412, False)
    assert not err.outcome_unknown
    assert str(err) == (
        "http://n0 answered 412: mod_index is 9 "
        "(precondition_failed; the key has mod_index 9, version 2)"
    )
    body = b'{"error":{"code":"precondition_failed","message":"m"},"current":{"exists":false}}'
    err = _server_error(Response("http://n0", 412, {}, body))
    assert isinstance(err, PreconditionFailedError) and err.current == Current(False)
    assert str(err.current) == "the key does not exist"
    # Without the state it is the plain server error, code and all.
    bare = b'{"error":{"code":"precondition_failed","message":"m"}}'
    err = _server_error(Response("http://n0", 412, {}, bare))
    assert type(err) is ServerError and err.code == "precondition_failed"


def test_an_unknown_outcome_is_a_lost_answer_or_a_5xx_that_may_hide_a_write() -> None:
    def coded(status: int, code: str) -> ServerError:
        body = b'{"error":{"code":"%s","message":"m"}}' % code.encode()
        return _server_error(Response("http://n0", status, {}, body))

    for code in ("commit_timeout", "quorum_timeout", "shutting_down", "storage_error"):
        assert coded(503, code).outcome_unknown, code
    for code in NOT_WRITTEN_CODES:
        assert not coded(503, code).outcome_unknown, code
    assert not coded(400, "invalid_txn").outcome_unknown
    assert not coded(429, "x").outcome_unknown
    assert KVTimeoutError("t").outcome_unknown
    assert TransportError("reset").outcome_unknown
    assert not ConnectError("refused").outcome_unknown, "nothing was sent"
