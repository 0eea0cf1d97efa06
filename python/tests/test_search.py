"""Full-text and similarity search through KVClient (kvd --index, docs/DESIGN.md §7).

Each test starts its own kvd with --index.
"""

from __future__ import annotations

from pathlib import Path

from kvstore.client import KVClient
from kvstore.codec import Value
from kvstore.cluster import start_node

DOCS: dict[str, Value] = {
    "doc/fox": "The quick brown fox jumps over the lazy dog",
    "doc/dog": {"title": "Dogs", "body": "A lazy dog sleeps all day", "year": 2020},
    "doc/cat": ["cats", "purr", "and", "sleep"],
    "doc/fox2": b"a fox, a fox, a red fox in the forest",  # raw UTF-8 text
    "doc/bin": b"\xff\xfe fox",  # not UTF-8: no text, never a hit
    "doc/num": 12345,
}


def test_full_text_search_ranks_and_follows_writes(tmp_path: Path) -> None:
    with start_node(tmp_path / "n0", index=True) as n:
        kv = KVClient(n.url)
        kv.bulk_set(DOCS)

        hits = kv.search("fox", 10)
        keys = [h.key for h in hits]
        assert set(keys) == {"doc/fox", "doc/fox2"}, keys
        assert keys[0] == "doc/fox2", "three mentions beat one"
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        assert all(h.score > 0 for h in hits)

        # Strings inside JSON values are indexed; keys and numbers are not.
        assert [h.key for h in kv.search("sleeps", 10)] == ["doc/dog"]
        assert [h.key for h in kv.search("purr", 10)] == ["doc/cat"]
        assert kv.search("12345", 10) == []

        # Several terms: documents with more of them rank higher; case folds.
        multi = [h.key for h in kv.search("LAZY Dog fox", 10)]
        assert multi[0] == "doc/fox", multi
        assert set(multi) == {"doc/fox", "doc/dog", "doc/fox2"}

        assert len(kv.search("fox", 1)) == 1, "limit is honoured"

        # Never stale after an acknowledged write.
        kv.delete("doc/fox2")
        kv.set("doc/fox", "no animals here")
        assert kv.search("fox", 10) == []
        kv.set("doc/new", "fox")
        assert [h.key for h in kv.search("fox", 10)] == ["doc/new"]


def test_similarity_search(tmp_path: Path) -> None:
    with start_node(tmp_path / "n0", index=True) as n:
        kv = KVClient(n.url)
        kv.bulk_set(DOCS)
        hits = kv.search_similar("lazy dog sleeps", 3)
        assert hits, "something is similar"
        assert hits[0].key == "doc/dog"
        assert len(hits) <= 3
        assert hits[0].score > 0
        assert all(0 <= h.score <= 1.0 + 1e-9 for h in hits), hits
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        # Nothing shares a term with "zebra": no document is similar to it.
        assert kv.search_similar("zebra", 5) == []


def test_the_index_is_rebuilt_after_a_restart(tmp_path: Path) -> None:
    with start_node(tmp_path / "n0", index=True) as n:
        kv = KVClient(n.url)
        kv.set("a", "persistent search terms")
        n.kill()
        n.restart()
        assert [h.key for h in kv.search("persistent", 5)] == ["a"]
