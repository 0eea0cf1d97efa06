#!/usr/bin/env bash
# The one test command (README "Test"): installs what the tests need, then
# build, formatting, lints, and every test. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")"

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== test dependencies"
# tests/prometheus.rs runs a real Prometheus server and promtool (Debian
# package `prometheus`). Installed only when missing; needs root or sudo.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

echo "== build (debug binaries used by the end-to-end tests)"
cargo build --workspace --bins --locked

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test (unit, crash-model, end-to-end)"
cargo test --workspace --locked
