"""A secured cluster run by kvsup (``spec.tls: auto``, docs/DESIGN.md §8):
the Python client reaches it with the CA and the client token kvsup made,
is refused without the token, and follows the primary kvsup elects after
the old one is killed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kvstore.client import KVClient
from kvstore.cluster import make_manifest, start_cluster, wait_until
from kvstore.errors import ServerError


def test_a_tls_auto_cluster_takes_the_ca_and_the_client_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KV_TOKEN", raising=False)
    manifest = make_manifest("pytls", 3, health_interval_ms=100, failure_threshold=3)
    manifest["spec"]["tls"] = "auto"
    with start_cluster(manifest, workdir=tmp_path) as cluster:
        status = cluster.status()
        ca = Path(status["tls"]["ca"])
        token_file = Path(status["tls"]["client_token_file"])
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert all(u.startswith("https://") for u in cluster.urls)

        with KVClient(cluster.urls, ca_file=str(ca), token=token) as kv:
            kv.set("py/a", "1")
            assert kv.get("py/a") == "1"

            with KVClient(cluster.urls, ca_file=str(ca), max_retries=0) as anon:
                with pytest.raises(ServerError) as err:
                    anon.get("py/a")
                assert err.value.status == 401

            old = cluster.primary
            assert old is not None
            cluster.kill_node(old, "KILL")

            def new_primary() -> str | None:
                p = cluster.status().get("primary")
                return p if p not in (None, old) else None

            wait_until(new_primary, 30, "kvsup elected a new primary")
            kv.set("py/b", "2")  # retried until the new primary takes it
            assert [kv.get("py/a"), kv.get("py/b")] == ["1", "2"]
