"""The README's Python quick start runs as printed and prints what its
comments say (the first block against a fresh node, whose URL replaces
http://127.0.0.1:8765; the second as is, in a temp dir)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from kvstore.cluster import Node

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Python client\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def expected_output(block: str) -> list[str]:
    out = []
    for line in block.splitlines():
        if line.strip().startswith("print(") and "  # " in line:
            out.append(line.rsplit("  # ", 1)[1])
    return out


def run(block: str, cwd: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", block], cwd=cwd, capture_output=True, timeout=60, env=os.environ
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().splitlines()


def test_readme_has_the_two_blocks() -> None:
    blocks = python_blocks()
    assert len(blocks) == 2
    assert all(len(expected_output(b)) >= 1 for b in blocks)


def test_quick_start_against_a_node(node: Node, tmp_path: Path) -> None:
    block = python_blocks()[0]
    assert "http://127.0.0.1:8765" in block
    assert run(block.replace("http://127.0.0.1:8765", node.url), tmp_path) == expected_output(block)


def test_notebook_block_starts_its_own_node(tmp_path: Path) -> None:
    block = python_blocks()[1]
    assert run(block, tmp_path) == expected_output(block)
    assert (tmp_path / "demo-data").is_dir()
