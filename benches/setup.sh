#!/usr/bin/env bash
# Installs the comparison servers the benchmarks measure kvd against
# (`compare`, `throughput`, `replicated`, `recovery`, `api`): etcd, single
# member or a 3-member cluster (Debian `etcd-server`, plus `etcd-client` for
# etcdctl) and Redis 7 (`redis-server`, `redis-tools` for redis-cli),
# and SQLite (`sqlite3`, `libsqlite3-dev`: the search benchmark's FTS5
# comparison links the system libsqlite3 with `--features sqlite-bench`).
#
# Idempotent: does nothing when every tool is already on PATH, so it is safe
# to run before each benchmark. Needs root (or sudo) only when installing.
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
# The library (and its pkg-config file) that rusqlite links against.
pkg-config --exists sqlite3 2>/dev/null || [ -e /usr/include/sqlite3.h ] || need+=(libsqlite3-dev)

if [ ${#need[@]} -eq 0 ]; then
    echo "setup: etcd, etcdctl, redis-server, redis-benchmark, sqlite3 and libsqlite3-dev are installed"
else
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "setup: installing ${need[*]}"
    $sudo apt-get update
    # The packages start system services on install where an init system
    # runs; the benchmarks never use those: they start their own servers on
    # free loopback ports in temp dirs.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${need[@]}"
fi

etcd --version | head -n 1
redis-server --version
sqlite3 --version
