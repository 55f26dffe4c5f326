#!/usr/bin/env bash
# Put PostgreSQL's server binaries (initdb, pg_ctl) on PATH, installing Debian's package when
# they are missing and this user may (root with apt-get). Tests that need them skip otherwise.
pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
if ! command -v initdb >/dev/null && [ -z "$pg_bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing PostgreSQL (Debian package) for the MLflow-server tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
        || echo "[test] could not install PostgreSQL; its tests will be skipped"
    pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
fi
if [ -n "$pg_bin" ]; then
    export PATH="$PATH:$pg_bin"
fi
