"""Primary/secondary replication through KVClient, with three real kvd
nodes: replication to secondaries, redirect following, and failover by
promoting a secondary (POST /promote_to_primary)."""

from __future__ import annotations

from conftest import StartThree

from kvstore.client import KVClient
from kvstore.cluster import wait_until


def test_primary_writes_are_visible_on_the_secondaries(start_three: StartThree) -> None:
    primary, s1, s2 = start_three()
    kv = KVClient(primary.url)
    for i in range(50):
        kv.set(f"r/{i}", {"i": i})
    kv.bulk_set([(f"rb/{i}", b"\x00" + bytes([i])) for i in range(50)])
    kv.delete("r/0")
    for secondary in (s1, s2):
        reader = KVClient(secondary.url)
        # Secondaries apply at commit, which they learn a heartbeat later.
        wait_until(lambda: reader.get("rb/49") is not None, 10, f"bulk applied on {secondary.node_id}")
        wait_until(lambda: reader.get("r/0") is None, 10, f"delete applied on {secondary.node_id}")
        assert [reader.get(f"r/{i}") for i in range(1, 50)] == [{"i": i} for i in range(1, 50)]
        assert [reader.get(f"rb/{i}") for i in range(50)] == [b"\x00" + bytes([i]) for i in range(50)]
        assert reader.status()["role"] == "secondary"


def test_writes_to_a_secondary_follow_the_redirect_to_the_primary(start_three: StartThree) -> None:
    primary, s1, _ = start_three()
    kv = KVClient(s1.url)
    kv.set("via-secondary", "ok")
    assert kv.current_endpoint == primary.url, "the client now prefers the primary"
    assert KVClient(primary.url).get("via-secondary") == "ok"
    # A bulk (a POST with a body) is re-sent to the primary whole.
    assert KVClient(s1.url).bulk_set([("b1", b"\x00"), ("b2", [2])]).count == 2
    assert KVClient(primary.url).get("b1") == b"\x00"
    # A linearizable read asked of a secondary is redirected too.
    assert KVClient(s1.url).get("via-secondary", consistent=True) == "ok"


def test_failover_kill_primary_promote_secondary_writes_work(start_three: StartThree) -> None:
    nodes = start_three()
    kv = KVClient([n.url for n in nodes])
    for i in range(100):
        kv.set(f"before/{i}", i)
    assert kv.current_endpoint == nodes[0].url

    nodes[0].kill()
    # Promote the most up-to-date secondary, as an operator (or kvsup) would:
    # a commit needs only one secondary, so the other may be an entry behind,
    # and kvd refuses to promote it (409 behind_peer).
    secondaries = sorted(nodes[1:], key=lambda n: -int(KVClient(n.url).status()["last_index"]))
    chosen = secondaries[0]
    promoted = KVClient(chosen.url).request("POST", "/promote_to_primary")
    assert promoted.status == 200, promoted.body
    assert promoted.json()["role"] == "primary" and promoted.json()["epoch"] == 2

    # The same client: its primary is gone, so it moves on (and, if it lands
    # on the other secondary, is redirected).
    for i in range(100):
        kv.set(f"after/{i}", i)
    assert kv.current_endpoint == chosen.url
    new_primary = KVClient(chosen.url)
    assert new_primary.status()["role"] == "primary"
    for prefix in ("before", "after"):
        assert [new_primary.get(f"{prefix}/{i}") for i in range(100)] == list(range(100))

    # The old primary comes back as a secondary of the new epoch and catches up.
    nodes[0].restart()
    old = KVClient(nodes[0].url)
    wait_until(lambda: old.get("after/99") == 99, 15, "old primary caught up")
    assert old.status()["role"] == "secondary"
    assert old.status()["epoch"] == 2
