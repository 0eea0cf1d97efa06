"""Fixtures: real kvd processes on free loopback ports in pytest's tmp_path.

Binaries come from KVSTORE_BIN_DIR, default <repo>/target/debug (test.sh
builds them with `cargo build --workspace --bins` first).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from kvstore.client import KVClient
from kvstore.cluster import Node, free_port, start_node

REPO = Path(__file__).resolve().parents[2]

if not os.environ.get("KVSTORE_BIN_DIR"):
    os.environ["KVSTORE_BIN_DIR"] = str(REPO / "target" / "debug")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """One kvd with --enable-debug (for debug_flaky)."""
    with start_node(tmp_path / "n0", enable_debug=True) as n:
        yield n


@pytest.fixture
def kv(node: Node) -> Iterator[KVClient]:
    """A client of `node`."""
    with KVClient(node.url) as client:
        yield client


StartThree = Callable[..., list[Node]]


@pytest.fixture
def start_three(tmp_path: Path) -> Iterator[StartThree]:
    """Starts three kvd nodes that know each other: primary/secondary (n0
    primary) by default, or masterless with mode="masterless". Every node is
    stopped at the end of the test."""
    started: list[Node] = []

    def start(
        mode: str | None = None, index: bool = False, extra_args: Sequence[str] = ()
    ) -> list[Node]:
        ports: list[int] = []
        while len(ports) < 3:
            p = free_port()
            if p not in ports:
                ports.append(p)
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        nodes = []
        for i, port in enumerate(ports):
            role = None if mode == "masterless" else ("primary" if i == 0 else "secondary")
            n = start_node(
                tmp_path / f"n{i}",
                port,
                node_id=f"n{i}",
                peers=[u for j, u in enumerate(urls) if j != i],
                role=role,
                mode=mode,
                index=index,
                extra_args=extra_args,
            )
            started.append(n)
            nodes.append(n)
        return nodes

    yield start
    for n in started:
        n.close()
