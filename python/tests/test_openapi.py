"""docs/openapi.json against a real kvd: the node serves exactly that file,
it is valid OpenAPI 3.1, it names every error code, and schemathesis finds
no server error and no answer outside it.

schemathesis runs as its command line in a subprocess, not through its
pytest plugin: one run covers all four of its phases (the schema's
examples, the coverage of every keyword's edges, random fuzzing, and
stateful sequences over the spec's links) under one seed, and each
failure comes with the curl command that reproduces it. The plugin gives
one test per operation and only the fuzzing phase.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from kvstore.cluster import Node, start_node

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "docs" / "openapi.json"

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
]

# Routes the run must not call:
# - POST /v1/admin/pause_writes really pauses the node: every write after
#   it would answer 503 writes_paused, and the rest of the run would test
#   nothing but that answer.
# The other admin routes are safe on a single node, so they are tested:
# promote, transfer and mode can only refuse there (409 no_peers, after
# their bodies are parsed), and resume_writes of an unpaused node changes
# nothing.
EXCLUDED_PATHS = ["/v1/admin/pause_writes"]

# Examples per operation and phase: the whole run stays within about 90 s
# on two cores (a debug kvd).
MAX_EXAMPLES = 100
SEED = 13


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(SPEC.read_text(encoding="utf-8"))
    return spec


def test_the_spec_is_valid_openapi_3_1() -> None:
    spec = load_spec()
    assert spec["openapi"].startswith("3.1.")
    validate(spec, cls=OpenAPIV31SpecValidator)


def test_the_node_serves_docs_openapi_json(node: Node) -> None:
    with urllib.request.urlopen(node.url + "/openapi.json", timeout=10) as r:
        assert r.status == 200
        assert r.headers.get_content_type() == "application/json"
        served = json.loads(r.read())
    assert served == load_spec()


def test_the_spec_names_every_error_code_of_kvproto() -> None:
    source = (REPO / "kvproto" / "src" / "code.rs").read_text(encoding="utf-8")
    codes = set(re.findall(r'pub const [A-Z_]+: &str = "([a-z_]+)";', source))
    assert len(codes) > 40, "the code constants were not found"
    documented = set(load_spec()["components"]["schemas"]["ErrorCode"]["enum"])
    assert documented == codes, (
        f"in kvproto only: {sorted(codes - documented)}; in the spec only: {sorted(documented - codes)}"
    )


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_spec(tmp_path: Path) -> None:
    # --index so that search and similar answer pages, --enable-debug so
    # that debug_flaky is taken rather than refused.
    with start_node(tmp_path / "n0", index=True, enable_debug=True) as node:
        command = [
            sys.executable, "-m", "schemathesis.cli", "run", str(SPEC),
            "--url", node.url,
            "--checks", ",".join(CHECKS),
            "--max-examples", str(MAX_EXAMPLES),
            "--seed", str(SEED),
            # No example database: every run starts from the seed alone.
            "--generation-database", "none",
            # One worker: CPython 3.11's ast.parse, which Hypothesis calls to
            # describe strategies, is not thread-safe ("AST constructor
            # recursion depth mismatch" with two).
            "--workers", "1",
            "--request-timeout", "10",
            "--no-color",
        ]
        for path in EXCLUDED_PATHS:
            command += ["--exclude-path", path]
        run = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
        )
    output = run.stdout + run.stderr
    if run.returncode != 0 or "No issues found" not in output:
        # The summary, every failure and its curl command are at the end.
        pytest.fail(f"schemathesis exited {run.returncode}:\n{output[-20000:]}", pytrace=False)
