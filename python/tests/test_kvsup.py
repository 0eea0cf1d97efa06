"""Clusters run by kvsup, started with kvstore.cluster.start_cluster: the
client follows the primary kvsup elects after the old one is killed, and
`kvsup down` (Cluster.stop) leaves no node running."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvstore.client import KVClient
from kvstore.cluster import make_manifest, start_cluster, wait_until
from kvstore.errors import ConnectError


def test_start_cluster_failover_by_kvsup(tmp_path: Path) -> None:
    manifest = make_manifest("pyfailover", 3, health_interval_ms=100, failure_threshold=3)
    with start_cluster(manifest, workdir=tmp_path) as cluster:
        status = cluster.status()
        assert status["conditions"]["Ready"] is True
        assert status["mode"] == "primary-secondary"
        assert len(cluster.urls) == 3
        old = cluster.primary
        assert old is not None
        kv = cluster.client()
        for i in range(50):
            kv.set(f"before/{i}", i)
        assert kv.current_endpoint == cluster.url_of(old)

        cluster.kill_node(old, "KILL")

        def new_primary() -> str | None:
            s = cluster.status()
            p = s.get("primary")
            return p if p not in (None, old) else None

        elected = wait_until(new_primary, 30, "kvsup elected a new primary")
        for i in range(50):
            kv.set(f"after/{i}", i)  # retried until the new primary takes it
        assert kv.current_endpoint == cluster.url_of(elected)
        for prefix in ("before", "after"):
            assert [kv.get(f"{prefix}/{i}") for i in range(50)] == list(range(50))
        # kvsup restarts the killed node; the cluster becomes Ready again.
        cluster.wait_ready(30)
        urls = cluster.urls
    # `kvsup down` has returned, so every node has exited.
    for url in urls:
        with pytest.raises(ConnectError):
            KVClient(url, max_retries=0).status()


def test_start_cluster_from_a_manifest_file(tmp_path: Path) -> None:
    path = tmp_path / "single.yaml"
    path.write_text(json.dumps(make_manifest("pysingle", 1)))
    with start_cluster(path) as cluster:
        kv = cluster.client()
        kv.set("k", {"from": "file"})
        assert kv.get("k") == {"from": "file"}
        assert (tmp_path / ".kvsup" / "pysingle" / "n0" / "data").is_dir()


def test_cluster_kill_stops_the_daemon_and_every_node(tmp_path: Path) -> None:
    cluster = start_cluster(make_manifest("pykill", 2), workdir=tmp_path)
    urls = cluster.urls
    pids = [n["pid"] for n in cluster.status()["nodes"]]
    daemon_pid = int((tmp_path / ".kvsup" / "pykill" / "kvsup.pid").read_text())
    cluster.kill()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A killed child of the daemon stays a zombie until reaped; it no
        # longer serves, which is what matters.
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        return state == "Z"

    for pid in [daemon_pid, *pids]:
        wait_until(lambda: gone(pid), 10, f"pid {pid} gone")

    # A killed multi-threaded process shows its leader as a zombie while its
    # other threads still exit, and only the last one closes the listening
    # socket; so "gone" is followed by waiting for connections to be refused.
    def refused(url: str) -> bool:
        try:
            KVClient(url, max_retries=0, timeout=2.0).status()
        except ConnectError:
            return True
        except Exception:  # a reset while the last thread exits
            return False
        return False

    for url in urls:
        wait_until(lambda: refused(url), 10, f"{url} refuses connections")


def test_start_cluster_masterless_writes_anywhere(tmp_path: Path) -> None:
    with start_cluster(make_manifest("pyml", 3, mode="masterless"), workdir=tmp_path) as cluster:
        assert cluster.status()["mode"] == "masterless"
        assert cluster.primary is None
        clients = [KVClient(url) for url in cluster.urls]
        for i, kv in enumerate(clients):
            kv.set(f"from/{i}", [i])
        for kv in clients:
            for i in range(3):
                wait_until(lambda: kv.get(f"from/{i}") == [i], 15, f"write of node {i} everywhere")
