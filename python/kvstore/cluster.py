"""Start real kvstore processes from Python: for tests, notebooks and demos.

- :func:`start_node` starts one ``kvd`` on a loopback port with a data dir you
  give it, waits until it answers ``/health`` and returns a :class:`Node`.
- :func:`start_cluster` applies a kvsup manifest (``kvsup apply -f``), waits
  until ``kvsup status --json`` reports the cluster Ready and returns a
  :class:`Cluster`.

Binaries are looked up in, in order: the ``bin_dir`` argument, the
``KVSTORE_BIN_DIR`` environment variable, the directory of ``kvd`` on
``PATH``, and ``target/debug`` or ``target/release`` of the nearest
enclosing directory (from the current one) that has them.

Only processes started here are ever signalled, by PID. A handle is a
context manager that stops its processes on exit, and a :class:`Node` still
running when the interpreter exits is killed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal as _signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from .client import KVClient, normalize_endpoint

__all__ = [
    "Node",
    "Cluster",
    "ProcessError",
    "start_node",
    "start_cluster",
    "make_manifest",
    "free_port",
    "find_bin_dir",
    "wait_until",
]

_T = TypeVar("_T")

#: How often conditions are polled while waiting.
_POLL_INTERVAL = 0.01


class ProcessError(RuntimeError):
    """A kvd or kvsup process did not start, stop or answer as expected. The
    message includes the tail of its log."""


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    cond: Callable[[], _T | None | bool],
    timeout: float,
    what: str = "condition",
) -> _T:
    """Polls ``cond`` until it returns something truthy, and returns that;
    raises :class:`TimeoutError` naming ``what`` after ``timeout`` seconds.
    Exceptions from ``cond`` propagate."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not hold within {timeout:g} s")
        time.sleep(_POLL_INTERVAL)


def find_bin_dir(bin_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding ``kvd`` (see the module docstring for the
    search order)."""
    if bin_dir is not None:
        return _check_bin_dir(Path(bin_dir))
    env = os.environ.get("KVSTORE_BIN_DIR")
    if env:
        return _check_bin_dir(Path(env))
    on_path = shutil.which("kvd")
    if on_path:
        return Path(on_path).resolve().parent
    here = Path.cwd().resolve()
    for parent in (here, *here.parents):
        for profile in ("debug", "release"):
            candidate = parent / "target" / profile
            if (candidate / "kvd").is_file():
                return candidate
    raise ProcessError(
        "kvd not found: build it (`cargo build --workspace --bins`), then set "
        "KVSTORE_BIN_DIR to target/debug, put it on PATH, or pass bin_dir="
    )


def _check_bin_dir(path: Path) -> Path:
    if not (path / "kvd").is_file():
        raise ProcessError(
            f"{path / 'kvd'} not found: build the binaries first "
            "(`cargo build --workspace --bins`) or point KVSTORE_BIN_DIR at them"
        )
    return path.resolve()


def _http_get(url: str, timeout: float) -> tuple[int, bytes] | None:
    """(status, body) of a GET, or None when nothing answered."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout) as resp:
            status: int = resp.status
            return status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (OSError, ValueError):
        return None


# Loopback checks must never go through an HTTP_PROXY from the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _tail(path: Path, max_bytes: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-max_bytes:].decode("utf-8", errors="replace")


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Finalizer: SIGKILL a process this module started if it still runs."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class Node:
    """A kvd process started by :func:`start_node`.

    Attributes: ``url``, ``port``, ``data_dir``, ``log_path``, ``node_id``,
    ``args`` (the flags after ``--port``/``--data-dir``), ``pid``.
    """

    def __init__(
        self,
        kvd: Path,
        data_dir: Path,
        port: int,
        args: list[str],
        node_id: str,
        log_path: Path,
        start_timeout: float,
    ) -> None:
        self.kvd = kvd
        self.data_dir = data_dir
        self.port = port
        self.args = args
        self.node_id = node_id
        self.log_path = log_path
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"<Node {self.node_id} {self.url} {state}>"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """The node's output so far (every start appends to one log)."""
        return _tail(self.log_path, 1 << 20)

    def client(self, **kwargs: Any) -> KVClient:
        """A :class:`KVClient` talking to this node only."""
        return KVClient(self.url, **kwargs)

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(self.kvd), "--port", str(self.port), "--data-dir", str(self.data_dir), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._finalizer = weakref.finalize(self, _reap, self._proc)

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Waits until ``/health`` answers 200; raises :class:`ProcessError`
        with the log if kvd exits or the deadline passes first."""
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            proc = self._proc
            if proc is None:
                raise ProcessError(f"kvd {self.node_id} is not running")
            code = proc.poll()
            if code is not None:
                raise ProcessError(
                    f"kvd {self.node_id} exited with {code} during start-up; log:\n{_tail(self.log_path)}"
                )
            answer = _http_get(self.url + "/health", 0.5)
            if answer is not None and answer[0] == 200:
                return
            if time.monotonic() >= deadline:
                raise ProcessError(
                    f"kvd {self.node_id} did not become healthy in {timeout:g} s; log:\n{_tail(self.log_path)}"
                )
            time.sleep(_POLL_INTERVAL)

    def signal(self, sig: int) -> None:
        """Sends ``sig`` to this node's process (and only it)."""
        if self._proc is None or self._proc.poll() is not None:
            raise ProcessError(f"kvd {self.node_id} is not running")
        self._proc.send_signal(sig)

    def kill(self) -> int:
        """SIGKILL, then reap; returns the exit status (``-9``)."""
        self.signal(_signal.SIGKILL)
        return self._wait_exit(30.0)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: in-flight writes finish), then wait; returns the
        exit status, 0 for a clean exit. Kills and raises if it does not exit
        within ``timeout``. Stopping a stopped node returns its last status."""
        if self._proc is None:
            raise ProcessError(f"kvd {self.node_id} was never started")
        if self._proc.poll() is not None:
            return self._proc.returncode
        self._proc.send_signal(_signal.SIGTERM)
        try:
            return self._wait_exit(timeout)
        except subprocess.TimeoutExpired as err:
            self._proc.kill()
            self._proc.wait()
            raise ProcessError(
                f"kvd {self.node_id} did not exit within {timeout:g} s of SIGTERM; killed. "
                f"log:\n{_tail(self.log_path)}"
            ) from err

    def _wait_exit(self, timeout: float) -> int:
        assert self._proc is not None
        return self._proc.wait(timeout)

    def restart(self, timeout: float | None = None) -> Node:
        """Starts the node again with the same port, data dir and flags and
        waits for ``/health``. The node must be stopped first."""
        if self.is_running():
            raise ProcessError(f"kvd {self.node_id} is still running; stop or kill it first")
        self._spawn()
        self.wait_healthy(timeout)
        return self

    def __enter__(self) -> Node:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops the node if it runs (SIGTERM, SIGKILL if that hangs)."""
        if self.is_running():
            try:
                self.stop()
            except ProcessError:
                pass


def start_node(
    data_dir: str | os.PathLike[str],
    port: int | None = None,
    *,
    peers: Sequence[str] = (),
    role: str | None = None,
    node_id: str = "n0",
    mode: str | None = None,
    index: bool = False,
    enable_debug: bool = False,
    extra_args: Sequence[str] = (),
    bin_dir: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> Node:
    """Starts ``kvd`` on ``127.0.0.1:port`` (a free port when ``port`` is
    None) with ``data_dir`` (created if missing), waits until it answers
    ``/health``, and returns its :class:`Node`.

    ``peers`` (base URLs) and ``role`` (``"primary"``/``"secondary"``) make a
    primary/secondary cluster member; ``mode="masterless"`` passes ``--mode``;
    ``index`` passes ``--index``; ``enable_debug`` passes ``--enable-debug``
    (for ``debug_flaky``). ``extra_args`` are appended verbatim. The log goes
    to ``log_path``, by default ``<data_dir>.log`` beside the data dir.
    """
    kvd = find_bin_dir(bin_dir) / "kvd"
    data = Path(data_dir).resolve()
    args = ["--node-id", node_id]
    if peers:
        args += ["--peers", ",".join(peers)]
    if role is not None:
        args += ["--role", role]
    if mode is not None:
        args += ["--mode", mode]
    if index:
        args.append("--index")
    if enable_debug:
        args.append("--enable-debug")
    args += list(extra_args)
    log = Path(log_path).resolve() if log_path is not None else data.with_name(data.name + ".log")
    # A port found free can be taken before kvd binds it: with a port of our
    # own choosing, try again on another.
    attempts = 1 if port is not None else 5
    last: ProcessError | None = None
    for _ in range(attempts):
        node = Node(kvd, data, port or free_port(), args, node_id, log, timeout)
        node._spawn()
        try:
            node.wait_healthy()
            return node
        except ProcessError as err:
            if node.is_running():
                node.kill()
            last = err
            lowered = str(err).lower()
            if "address already in use" not in lowered and "binding" not in lowered:
                raise
    assert last is not None
    raise last


# -- kvsup clusters -----------------------------------------------------------


def make_manifest(
    name: str = "demo",
    nodes: int = 3,
    *,
    mode: str = "primary-secondary",
    index: bool = False,
    state_dir: str | None = None,
    health_interval_ms: int = 200,
    failure_threshold: int = 3,
    kvd_args: Sequence[str] = (),
) -> dict[str, Any]:
    """A kvsup manifest (as a dict) for ``nodes`` nodes on free loopback
    ports, with a supervisor on a free port; state under ``state_dir``
    (default ``.kvsup/<name>``, relative to the manifest's directory)."""
    ports: set[int] = set()
    while len(ports) < nodes + 1:
        ports.add(free_port())
    ordered = sorted(ports)
    spec: dict[str, Any] = {
        "mode": mode,
        "index": index,
        "stateDir": state_dir if state_dir is not None else f".kvsup/{name}",
        "nodes": [{"name": f"n{i}", "port": ordered[i]} for i in range(nodes)],
        "healthCheck": {"intervalMs": health_interval_ms, "failureThreshold": failure_threshold},
        "supervisor": {"port": ordered[nodes]},
    }
    if kvd_args:
        spec["kvdArgs"] = list(kvd_args)
    return {"apiVersion": "kvstore/v1", "kind": "Cluster", "metadata": {"name": name}, "spec": spec}


class Cluster:
    """A kvsup-managed cluster started by :func:`start_cluster`."""

    def __init__(self, kvsup: Path, kvd: Path, manifest_path: Path, command_timeout: float) -> None:
        self.kvsup = kvsup
        self.kvd = kvd
        self.manifest_path = manifest_path
        self.workdir = manifest_path.parent
        self.command_timeout = command_timeout
        self._last_status: dict[str, Any] | None = None
        self._stopped = False

    def __repr__(self) -> str:
        return f"<Cluster {self.manifest_path}>"

    def _run(self, *args: str, timeout: float | None = None) -> str:
        cmd = [str(self.kvsup), *args]
        try:
            done = subprocess.run(
                cmd,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout or self.command_timeout,
            )
        except subprocess.TimeoutExpired as err:
            raise ProcessError(f"`{' '.join(cmd)}` did not finish in {err.timeout:g} s") from err
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode("utf-8", errors="replace").strip()
            raise ProcessError(f"`{' '.join(cmd)}` exited with {done.returncode}: {out}")
        return done.stdout.decode("utf-8", errors="replace")

    def status(self) -> dict[str, Any]:
        """``kvsup status --json``: cluster, mode, conditions, primary, epoch,
        nodes (name, url, pid, role, healthy, ...)."""
        doc = json.loads(self._run("status", "--json", "-f", str(self.manifest_path)))
        if not isinstance(doc, dict):
            raise ProcessError(f"kvsup status --json printed {doc!r}, not an object")
        self._last_status = doc
        return doc

    def is_ready(self) -> bool:
        return bool(self.status().get("conditions", {}).get("Ready"))

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Polls the status until the cluster is Ready; returns that status."""
        def ready() -> dict[str, Any] | None:
            try:
                s = self.status()
            except ProcessError:
                return None  # the daemon may still be starting
            return s if s.get("conditions", {}).get("Ready") else None

        try:
            return wait_until(ready, timeout, "cluster Ready")
        except TimeoutError as err:
            raise ProcessError(f"{err}; last status: {self._last_status}; kvsup log:\n{self.daemon_log()}") from err

    @property
    def urls(self) -> list[str]:
        """Every node's base URL, in manifest order."""
        return [normalize_endpoint(str(n["url"])) for n in self.status().get("nodes", [])]

    @property
    def primary(self) -> str | None:
        """Name of the current primary (None in masterless mode or during a
        failover)."""
        p = self.status().get("primary")
        return str(p) if p is not None else None

    def url_of(self, node: str) -> str:
        for n in self.status().get("nodes", []):
            if n.get("name") == node:
                return normalize_endpoint(str(n["url"]))
        raise KeyError(node)

    def client(self, **kwargs: Any) -> KVClient:
        """A :class:`KVClient` over every node of the cluster."""
        return KVClient(self.urls, **kwargs)

    def kill_node(self, node: str, signal: str = "KILL") -> None:
        """``kvsup kill NODE --signal KILL|TERM|STOP|CONT``."""
        self._run("kill", node, "--signal", signal, "-f", str(self.manifest_path))

    def promote(self, node: str) -> None:
        """``kvsup promote NODE``."""
        self._run("promote", node, "-f", str(self.manifest_path))

    def apply(self, manifest: Mapping[str, Any] | None = None) -> None:
        """Re-applies the manifest (optionally a new version of it, e.g. with
        another mode), like editing the file and running ``kvsup apply``."""
        if manifest is not None:
            self.manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        self._run("apply", "-f", str(self.manifest_path), "--kvd", str(self.kvd))

    def stop(self, timeout: float = 60.0) -> None:
        """``kvsup down``: stops every node (SIGTERM) and the daemon, and
        returns once all exited."""
        if self._stopped:
            return
        self._run("down", "-f", str(self.manifest_path), timeout=timeout)
        self._stopped = True

    def kill(self) -> None:
        """SIGKILLs the supervisor daemon (first, so it restarts nothing) and
        then every node it reported, by PID. For emergencies and crash tests;
        :meth:`stop` is the clean way."""
        pids: list[int] = []
        state_dir = self._state_dir()
        if state_dir is not None:
            try:
                pids.append(int((state_dir / "kvsup.pid").read_text().strip()))
            except (OSError, ValueError):
                pass
        status = self._last_status
        try:
            status = self.status()
        except (ProcessError, ValueError):
            pass
        for n in (status or {}).get("nodes", []):
            if isinstance(n.get("pid"), int):
                pids.append(n["pid"])
        for pid in pids:
            try:
                os.kill(pid, _signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._stopped = True

    def _state_dir(self) -> Path | None:
        try:
            text = self.manifest_path.read_text()
        except OSError:
            return None
        try:
            state = Path(json.loads(text)["spec"]["stateDir"])
        except (ValueError, KeyError, TypeError):
            # A YAML manifest: find the one line that matters without a YAML
            # parser (the package has no dependencies).
            found = re.search(r"^\s*stateDir:\s*['\"]?([^'\"#\s]+)", text, re.MULTILINE)
            if found is None:
                return None
            state = Path(found.group(1))
        return state if state.is_absolute() else self.workdir / state

    def daemon_log(self) -> str:
        state_dir = self._state_dir()
        return _tail(state_dir / "kvsup.log") if state_dir is not None else "(unknown state dir)"

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        except ProcessError:
            self.kill()


def start_cluster(
    manifest: str | os.PathLike[str] | Mapping[str, Any],
    *,
    workdir: str | os.PathLike[str] | None = None,
    bin_dir: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
    wait_ready: bool = True,
) -> Cluster:
    """Applies a kvsup manifest and returns the :class:`Cluster` once it is
    Ready (``kvsup status --json`` reports ``conditions.Ready``).

    ``manifest`` is a path to a YAML file, or a dict (see
    :func:`make_manifest`), which is written as JSON (valid YAML) to
    ``<workdir>/<name>.yaml``; ``workdir`` defaults to a new temp dir.
    ``kvsup`` runs in the manifest's directory, so a relative ``stateDir``
    lands beside it.
    """
    bins = find_bin_dir(bin_dir)
    kvsup = bins / "kvsup"
    if not kvsup.is_file():
        raise ProcessError(f"{kvsup} not found: build kvsup (`cargo build --workspace --bins`)")
    if isinstance(manifest, Mapping):
        where = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="kvsup-"))
        where.mkdir(parents=True, exist_ok=True)
        name = str(manifest.get("metadata", {}).get("name", "cluster"))
        path = where.resolve() / f"{name}.yaml"
        path.write_text(json.dumps(manifest, indent=2) + "\n")
    else:
        path = Path(manifest).resolve()
    cluster = Cluster(kvsup, bins / "kvd", path, command_timeout=max(timeout, 10.0))
    cluster.apply()
    if wait_ready:
        try:
            cluster.wait_ready(timeout)
        except BaseException:
            cluster.kill()
            raise
    return cluster
