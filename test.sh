#!/usr/bin/env bash
# The one test command (README, "The two commands"): installs what the tests need, then
# build, formatting, lints, and every test. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")"

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== test dependencies"
# Debian packages the tests run, installed only when missing (needs root or
# sudo): a real Prometheus server and promtool (tests/prometheus.rs),
# iproute2's `ip` for the network namespaces that stand in for hosts
# (tests/hosts*.rs), systemd-analyze, which checks the unit files
# `kvsup render systemd` writes, and headless Chromium for kvsup's dashboard.
need=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
command -v ip >/dev/null || need+=(iproute2)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "== build (debug binaries used by the end-to-end tests)"
cargo build --workspace --bins --locked

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests (unit, crash-model, end-to-end)"
# cargo-nextest runs every test of every binary as one pool (two at a time
# on two cores), so a long end-to-end test no longer holds up the binaries
# after it; plain cargo test when it is not installed. Doctests need cargo
# test either way.
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
    cargo test --workspace --locked --doc
else
    cargo test --workspace --locked
fi

echo "== Python client (python/): pip install, mypy --strict, pytest against target/debug"
# A venv under target/ (ignored by git), reused between runs. Debian's
# python3 lacks ensurepip until python3-venv is installed. The pytest run
# includes schemathesis against a real kvd (python/tests/test_openapi.py);
# it and every tool come from PyPI at the exact versions of
# python/requirements-dev.txt, their dependencies pinned too.
PYENV="$PWD/target/pyenv"
if [ ! -x "$PYENV/bin/pip" ]; then
    rm -rf "$PYENV"
    if ! python3 -m venv "$PYENV" >/dev/null 2>&1 || [ ! -x "$PYENV/bin/pip" ]; then
        rm -rf "$PYENV"
        echo "python3 -m venv failed; installing Debian's python3-venv"
        SUDO=""
        if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        python3 -m venv "$PYENV" || { rm -rf "$PYENV"; /usr/bin/python3 -m venv "$PYENV"; }
    fi
fi
"$PYENV/bin/python" -m pip install --quiet --disable-pip-version-check -r python/requirements-dev.txt
"$PYENV/bin/python" -m pip install --quiet --no-deps --force-reinstall ./python
# pytest (not `python -m pytest`) so the tests import the installed package.
export KVSTORE_BIN_DIR="${KVSTORE_BIN_DIR:-$PWD/target/debug}"
(cd python && "$PYENV/bin/mypy" --strict kvstore tests && "$PYENV/bin/pytest" -q)
