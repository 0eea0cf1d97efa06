"""Masterless mode through KVClient (kvd --mode masterless, docs/DESIGN.md §5):
every node takes writes, and every write reaches every node.

Needs a kvd built with masterless mode. Until that lands on main, these
tests fail at start-up: kvd does not know --mode.
"""

from __future__ import annotations

from conftest import StartThree

from kvstore.client import KVClient
from kvstore.cluster import wait_until


def test_writes_on_any_node_are_visible_on_all(start_three: StartThree) -> None:
    nodes = start_three(mode="masterless")
    clients = [KVClient(n.url) for n in nodes]
    for i, kv in enumerate(clients):
        kv.set(f"from/{i}", {"node": i})
        kv.bulk_set([(f"bulk/{i}/{j}", j) for j in range(20)])
        # Nothing is redirected: the node that was asked took the write.
        assert kv.current_endpoint == nodes[i].url
    for reader, n in zip(clients, nodes):
        for i in range(3):
            wait_until(lambda: reader.get(f"bulk/{i}/19") == 19, 15, f"bulk of n{i} on {n.node_id}")
            assert reader.get(f"from/{i}") == {"node": i}
        assert reader.status()["mode"] == "masterless"


def test_last_write_wins_and_deletes_propagate(start_three: StartThree) -> None:
    nodes = start_three(mode="masterless")
    a, b, c = (KVClient(n.url) for n in nodes)
    a.set("k", "first")
    wait_until(lambda: c.get("k") == "first", 15, "first write on n2")
    b.set("k", "second")  # later timestamp: wins everywhere
    for kv in (a, b, c):
        wait_until(lambda: kv.get("k") == "second", 15, "second write everywhere")
    c.delete("k")
    for kv in (a, b, c):
        wait_until(lambda: kv.get_raw("k") is None, 15, "delete everywhere")


def test_a_client_over_all_nodes_survives_a_dead_node(start_three: StartThree) -> None:
    nodes = start_three(mode="masterless")
    kv = KVClient([n.url for n in nodes], backoff_initial=0.01)
    nodes[0].kill()
    kv.set("still", "writable")
    survivor = KVClient(nodes[2].url)
    wait_until(lambda: survivor.get("still") == "writable", 15, "write reached n2")
    nodes[0].restart()
    back = KVClient(nodes[0].url)
    wait_until(lambda: back.get("still") == "writable", 15, "restarted node caught up")
