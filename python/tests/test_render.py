"""``kvsup render``: the Kubernetes objects it writes pass the API's own
schemas (kubernetes-validate, strict, for a named Kubernetes version), and
the systemd units pass ``systemd-analyze verify``. Each check is also shown
to fail on a broken object or unit, so a pass means something. Nothing is
applied to an API server and no unit is started by systemd here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from kvstore.cluster import find_bin_dir

# The schemas kubernetes-validate checks against (it ships them).
KUBERNETES_VERSION = "1.37.0"


def manifest(name: str, addresses: list[str], state_dir: Path) -> dict[str, Any]:
    """A 3-node ``tls: auto`` cluster whose nodes something else runs."""
    return {
        "apiVersion": "kvstore/v1",
        "kind": "Cluster",
        "metadata": {"name": name},
        "spec": {
            "stateDir": str(state_dir),
            "tls": "auto",
            "nodes": [
                {"name": f"{name}-{i}", "port": 8765, "address": a, "runtime": "external"}
                for i, a in enumerate(addresses)
            ],
            "kvdArgs": ["--sync-replicas=1"],
        },
    }


def write_manifest(path: Path, m: dict[str, Any]) -> Path:
    path.write_text(json.dumps(m))  # JSON is YAML
    return path


def kvsup(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = find_bin_dir() / "kvsup"
    return subprocess.run(
        [str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def k8s_validate(files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            KUBERNETES_VERSION,
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_pod_script(script: str, hostname: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", script],
        env={"HOSTNAME": hostname, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=10,
    )


def one_file_each(objects: list[dict[str, Any]], into: Path) -> list[Path]:
    into.mkdir()
    files = []
    for i, o in enumerate(objects):
        f = into / f"{i}-{o['kind']}.yaml"
        f.write_text(yaml.safe_dump(o))
        files.append(f)
    return files


def test_the_kubernetes_objects_pass_the_api_schemas_and_a_broken_one_does_not(
    tmp_path: Path,
) -> None:
    pods = [f"kv-{i}.kv.prod.svc.cluster.local" for i in range(3)]
    m = write_manifest(tmp_path / "kv.yaml", manifest("kv", pods, tmp_path / "state"))
    out = tmp_path / "kv-k8s.yaml"
    r = kvsup("render", "kubernetes", "-f", m, "--namespace", "prod", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mode & 0o077 == 0  # it holds private keys
    objects: list[dict[str, Any]] = list(yaml.safe_load_all(out.read_text()))
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Secret",
        "Secret",
        "Service",
        "StatefulSet",
    ]
    checked = k8s_validate(one_file_each(objects, tmp_path / "each"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count(" passed for resource ") == len(objects), checked.stdout

    by_kind = {o["kind"]: o for o in objects}
    secrets = [o for o in objects if o["kind"] == "Secret"]
    node_files = next(s for s in secrets if "kv-0.key" in s["stringData"])["stringData"]
    assert "ca.key" not in node_files and "client.token" not in node_files
    pod = by_kind["StatefulSet"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["secret"]["defaultMode"] == 0o600
    script = pod["containers"][0]["command"][2]
    assert "--role primary" not in script
    # The pod picks its node's line by host name (echo stands in for kvd).
    picked = run_pod_script(script.replace("/usr/local/bin/kvd", "echo"), "kv-1")
    assert picked.returncode == 0, picked.stderr
    assert "--node-id kv-1 " in picked.stdout
    assert "--data-dir /var/lib/kvstore/kv-1/data " in picked.stdout
    stranger = run_pod_script(script, "kv-9")
    assert stranger.returncode == 1 and "kv-9" in stranger.stderr
    inside = yaml.safe_load(by_kind["ConfigMap"]["data"]["cluster.yaml"])
    assert inside["spec"]["stateDir"] == "/var/lib/kvstore"

    broken = dict(by_kind["StatefulSet"])
    broken["spec"] = {k: v for k, v in broken["spec"].items() if k != "selector"}
    failed = k8s_validate(one_file_each([broken], tmp_path / "broken"))
    assert failed.returncode != 0, failed.stdout
    assert "selector" in failed.stdout + failed.stderr


def test_nodes_that_are_not_the_stateful_sets_pods_are_refused_with_what_to_write(
    tmp_path: Path,
) -> None:
    hosts = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    m = write_manifest(tmp_path / "kv.yaml", manifest("kv", hosts, tmp_path / "state"))
    r = kvsup("render", "kubernetes", "-f", m, cwd=tmp_path)
    assert r.returncode == 1
    assert "address: kv-1.kv.default.svc.cluster.local" in r.stderr, r.stderr
    assert not (tmp_path / "state").exists()  # no credentials made


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is not installed (../test.sh installs Debian's systemd)")
    return exe


def verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_systemd_units_verify_and_a_broken_one_does_not(tmp_path: Path) -> None:
    hosts = ["10.9.0.1", "10.9.0.2", "10.9.0.3"]
    state = tmp_path / "state"
    m = write_manifest(tmp_path / "demo.yaml", manifest("demo", hosts, state))
    out = tmp_path / "units"
    r = kvsup("render", "systemd", "-f", m, "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    units = sorted(out.iterdir())
    assert [u.name for u in units] == [
        "kvstore-demo-demo-0.service",
        "kvstore-demo-demo-1.service",
        "kvstore-demo-demo-2.service",
        "kvsup-demo.service",
    ]
    # The credentials the units name exist, and each host is told its own.
    assert (state / "creds" / "demo-1.key").is_file()
    assert f"host 10.9.0.2 (node demo-1): {out / 'kvstore-demo-demo-1.service'}" in r.stdout
    checked = verify(units)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    text = units[0].read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.startswith(f"ExecStart={find_bin_dir() / 'kvd'} --port 8765 ")
    assert "--role secondary" in exec_start and "--role primary" not in text
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace(exec_start, "ExecStart=/nonexistent/kvd --port 8765"))
    failed = verify([broken])
    assert failed.returncode != 0, failed.stdout + failed.stderr


def test_a_manifest_without_an_external_node_renders_no_unit_and_writes_nothing(
    tmp_path: Path,
) -> None:
    m = manifest("demo", ["127.0.0.1"] * 3, tmp_path / "state")
    for i, n in enumerate(m["spec"]["nodes"]):
        del n["runtime"]
        n["port"] = 8765 + i
    path = write_manifest(tmp_path / "demo.yaml", m)
    r = kvsup("render", "systemd", "-f", path, "--out", tmp_path / "units", cwd=tmp_path)
    assert r.returncode == 1
    assert "runtime: external" in r.stderr, r.stderr
    assert not (tmp_path / "units").exists() and not (tmp_path / "state").exists()
