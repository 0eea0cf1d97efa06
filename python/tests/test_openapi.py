"""docs/openapi.json against a real kvd: the node serves exactly that file,
it is valid OpenAPI 3.1, it names every error code, and schemathesis finds
no server error and no answer outside it.

schemathesis runs as its command line in a subprocess, not through its
pytest integration: one command runs all four of its phases (the spec's
examples, the edges of every schema keyword, random fuzzing, and
stateful sequences over the spec's links; the integration needs a
separate state-machine test for the last) under one seed and budget,
each failure comes with the curl command that reproduces it, and the
same command can be run by hand against any node.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from conftest import StartThree

from kvstore.cluster import Node, start_node, wait_until

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "docs" / "openapi.json"

# Loopback requests never go through an HTTP proxy from the environment.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    # A request outside the schema (a malformed If-Match, a limit out of
    # range, a body of the wrong shape) must be refused with one of
    # NEGATIVE_STATUSES. schemathesis does not count an unknown query
    # parameter alone as outside the schema: that rule has its own test
    # below, over every operation of the spec.
    "negative_data_rejection",
]

# What refuses a request outside the schema: 400, or 413, 414, 431 for one
# over a size limit. Not 404, 409 or 412: the request's shape, not the
# node's data or mode, must be what refuses it.
NEGATIVE_STATUSES = [400, 413, 414, 431]

# The one route no run calls: POST /v1/admin/pause_writes really pauses
# the node, so every write after it would answer 503 writes_paused and the
# rest of the run would test nothing but that. The other admin routes are
# safe: on a single node promote, transfer and mode can only refuse (409
# no_peers, after their bodies are parsed); in a cluster transfer and mode
# refuse while writes are not paused (409), and resume_writes of an
# unpaused node changes nothing. Promotion is left out on a secondary.
PAUSE = "/v1/admin/pause_writes"

# A watch with valid parameters streams until the client goes: no phase
# could ever read its answer whole. It stays in the unknown-parameter check
# (which it answers with 400 at once), and its bad parameters are held to
# the spec by the watch tests.
WATCH = "/v1/watch"

# Examples per operation and phase: the three runs together stay within
# about 90 s on two cores (debug builds). The single node gets the most;
# the cluster runs check what only a cluster answers (307, stamps, 409).
MAX_EXAMPLES = 100
CLUSTER_EXAMPLES = 15
SEED = 13


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(SPEC.read_text(encoding="utf-8"))
    return spec


def test_the_spec_is_valid_openapi_3_1() -> None:
    spec = load_spec()
    assert spec["openapi"].startswith("3.1.")
    validate(spec, cls=OpenAPIV31SpecValidator)


def test_the_node_serves_docs_openapi_json(node: Node) -> None:
    with NO_PROXY.open(node.url + "/openapi.json", timeout=10) as r:
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


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (method, path, operation) of the spec."""
    methods = {"get", "head", "put", "post", "delete"}
    return [
        (method.upper(), path, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in methods
    ]


def example_request(spec: dict[str, Any], path: str, op: dict[str, Any]) -> tuple[str, bytes | None]:
    """A valid request of `op`, from the spec's examples: the target (path
    and required query parameters) and the body."""
    query = []
    for param in op.get("parameters", []):
        param = resolve(spec, param)
        if param["in"] == "query" and param.get("required"):
            query.append(f"{param['name']}={urllib.parse.quote(param['example'], safe='')}")
    target = path.replace("{key}", "k").replace("{id}", "1") + ("?" + "&".join(query) if query else "")
    body = op.get("requestBody", {}).get("content", {})
    if "application/json" in body:
        return target, json.dumps(body["application/json"]["example"]).encode()
    if "application/octet-stream" in body:
        return target, body["application/octet-stream"]["example"].encode()
    return target, None


def resolve(spec: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """`item`, or what its local `$ref` points at."""
    if "$ref" not in item:
        return item
    found: dict[str, Any] = spec
    for part in item["$ref"].removeprefix("#/").split("/"):
        found = found[part]
    return found


def call(url: str, method: str, body: bytes | None = None) -> tuple[int, Any]:
    """Status and JSON body (None without one) of one request."""
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with NO_PROXY.open(req, timeout=10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    return status, json.loads(raw) if raw.startswith(b"{") else None


# What /v1/status must keep across refused requests: no write, no pause,
# no change of mode or epoch.
UNCHANGED = ["last_index", "keys", "digest", "writes_paused", "mode", "epoch", "role"]


def test_every_operation_refuses_a_parameter_it_does_not_take(node: Node) -> None:
    spec = load_spec()
    _, before = call(node.url + "/v1/status", "GET")
    for method, path, op in operations(spec):
        target, body = example_request(spec, path, op)
        sep = "&" if "?" in target else "?"
        url = f"{node.url}{target}{sep}no_such_parameter=1"
        status, answer = call(url, method, body)
        what = f"{method} {target} with no_such_parameter"
        assert status == 400, f"{what}: {status} {answer}"
        if method != "HEAD":
            assert answer["error"]["code"] == "unknown_parameter", f"{what}: {answer}"
            assert "no_such_parameter" in answer["error"]["message"], f"{what}: {answer}"
    _, after = call(node.url + "/v1/status", "GET")
    assert {f: after[f] for f in UNCHANGED} == {f: before[f] for f in UNCHANGED}


def schemathesis(
    tmp_path: Path,
    url: str,
    max_examples: int,
    excluded: list[str],
    negative_statuses: list[int] = NEGATIVE_STATUSES,
) -> None:
    """Runs schemathesis against the node at `url` with CHECKS, and fails
    with its report unless it found nothing."""
    config = tmp_path / "schemathesis.toml"
    statuses = ", ".join(map(str, negative_statuses))
    config.write_text(f"[checks.negative_data_rejection]\nexpected-statuses = [{statuses}]\n")
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
        "run", str(SPEC),
        "--url", url,
        "--checks", ",".join(CHECKS),
        "--max-examples", str(max_examples),
        "--seed", str(SEED),
        # No example database: every run starts from the seed alone.
        "--generation-database", "none",
        # One worker: CPython 3.11's ast.parse, which Hypothesis calls to
        # describe strategies, is not thread-safe ("AST constructor
        # recursion depth mismatch" with two).
        "--workers", "1",
        "--request-timeout", "10",
        "--no-color",
        # Reproduce commands as sent (keys named like secrets stay).
        "--output-sanitize", "false",
    ]
    for path in excluded:
        command += ["--exclude-path", path]
    # The nodes are on loopback: no proxy from the environment in between.
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    run = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if run.returncode != 0:
        # The summary, every failure and its curl command are at the end.
        output = run.stdout + run.stderr
        pytest.fail(f"schemathesis exited {run.returncode}:\n{output[-20000:]}", pytrace=False)


def test_schemathesis_finds_nothing_on_a_single_node(tmp_path: Path) -> None:
    # --index so that search and similar answer pages, --enable-debug so
    # that debug_flaky is taken rather than refused.
    with start_node(tmp_path / "n0", index=True, enable_debug=True) as node:
        schemathesis(tmp_path, node.url, MAX_EXAMPLES, [PAUSE, WATCH])


def test_schemathesis_finds_nothing_on_a_secondary(start_three: StartThree, tmp_path: Path) -> None:
    """Writes and consistent reads answer 307 to the primary, reads are
    local, and the status lists peers."""
    primary, secondary, _ = start_three()
    # Keys to read on the secondary, so that its GETs answer 200 with the
    # version headers and its pages have items.
    items = [{"key": f"seed/{i}", "value": "v" if i % 2 else {"base64": "AAEC"}} for i in range(20)]
    status, answer = call(primary.url + "/v1/bulk", "POST", json.dumps({"items": items}).encode())
    assert status == 200, answer
    wait_until(lambda: status_of(secondary.url)["keys"] == len(items), 30, "the secondary applied the bulk")
    assert status_of(secondary.url)["primary"] == primary.url
    # Promotion would make the secondary primary for real. A write is
    # redirected before its body is read, so a bad one answers 307 here
    # too (the primary refuses it).
    excluded = [PAUSE, WATCH, "/promote_to_primary", "/v1/admin/promote"]
    schemathesis(tmp_path, secondary.url, CLUSTER_EXAMPLES, excluded, NEGATIVE_STATUSES + [307])


def test_schemathesis_finds_nothing_on_a_masterless_node(start_three: StartThree, tmp_path: Path) -> None:
    """Writes carry stamps, ETags are stamps, conditional writes,
    compares, lease routes and lease= answer 409 unsupported_in_masterless."""
    node, _, _ = start_three(mode="masterless")
    # A write with If-Match or If-None-Match is 409 there whatever the
    # header holds (its ETags are stamps, not mod_indexes): a malformed
    # one too. So is every lease route, before it reads anything.
    # A valid peer set really replaces the node's peers (an empty one cuts
    # it off from the others): the peer routes' refusals are held to the
    # spec by the masterless membership tests instead.
    excluded = [PAUSE, WATCH, "/v1/admin/peers"]
    schemathesis(tmp_path, node.url, CLUSTER_EXAMPLES, excluded, NEGATIVE_STATUSES + [409])


def status_of(url: str) -> dict[str, Any]:
    status, body = call(url + "/v1/status", "GET")
    assert status == 200, body
    answer: dict[str, Any] = body
    return answer
