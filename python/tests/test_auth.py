"""KVClient with a bearer token against a real kvd with ``--auth-file``
(docs/DESIGN.md §2.18): the token goes with every request and with
watches, a token's prefixes bound what it reads and writes, and a node
asks a client without one for it (401)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.client import KVClient
from kvstore.cluster import Node, start_node
from kvstore.errors import ConfigError, ServerError

APP = "app-secret-0123456789abcdef"
OPS = "ops-secret-0123456789abcdef"


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Node]:
    tokens = {"tokens": [
        {"name": "app", "sha256": _sha(APP), "read": ["app/"], "write": ["app/"]},
        {"name": "ops", "sha256": _sha(OPS), "read": [""], "write": [""], "admin": True},
    ]}
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(tokens))
    with start_node(tmp_path / "n0", extra_args=["--auth-file", str(path)]) as n:
        yield n


def test_the_token_goes_with_every_request_and_bounds_what_it_may_touch(secured: Node) -> None:
    with KVClient(secured.url, token=APP, max_retries=0) as kv:
        kv.set("app/a", "1")
        assert kv.get("app/a") == "1"
        with pytest.raises(ServerError) as err:
            kv.set("other/a", "1")
        assert (err.value.status, err.value.code) == (403, "permission_denied")
    with KVClient(secured.url, token=OPS) as kv:
        kv.set("other/a", "2")
    with KVClient(secured.url, token=APP) as kv:
        assert [item.key for item in kv.list("")] == ["app/a"]


def test_without_a_token_the_node_asks_for_one(secured: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KV_TOKEN", raising=False)
    with KVClient(secured.url, max_retries=0) as kv, pytest.raises(ServerError) as err:
        kv.get("app/a")
    assert (err.value.status, err.value.code) == (401, "unauthenticated")
    monkeypatch.setenv("KV_TOKEN", APP)
    with KVClient(secured.url) as kv:
        assert kv.get("app/none") is None


def test_a_watch_sends_the_token_and_streams_only_readable_keys(secured: Node) -> None:
    with KVClient(secured.url, token=OPS) as ops:
        ops.set("other/w", "x")
        last = ops.set("app/w", "y")
    with KVClient(secured.url, token=APP) as kv:
        seen: list[str] = []
        with kv.watch("", from_index=1) as events:
            for e in events:
                if e["type"] == "put":
                    seen.append(e["key"])
                if e["type"] == "progress" and e["index"] >= last:
                    break
        assert seen == ["app/w"]


def test_a_token_that_is_not_printable_ascii_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        KVClient("http://127.0.0.1:1", token="tab\there")
    with pytest.raises(ConfigError):
        KVClient("http://127.0.0.1:1", token=" ")
