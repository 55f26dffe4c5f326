#!/usr/bin/env bash
# The whole test suite on a fresh machine: creates .venv when missing, makes sure a PostgreSQL
# server is installed (the MLflow-on-PostgreSQL tests start their own) and Chromium (the MLflow-UI
# test), then lint + pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
source "$ROOT/scripts/ensure_postgres.sh"
source "$ROOT/scripts/ensure_chromium.sh"
ruff check .
pytest "$@"
