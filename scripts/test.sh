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
# The suite's checkpoints and MLflow stores take about 3 GB of the temp directory at their peak.
scratch="$(python -c 'import tempfile; print(tempfile.gettempdir())')"
free_mb=$(($(df -Pk "$scratch" | awk 'NR == 2 {print $4}') / 1024))
if ((free_mb < 4096)); then
  echo "scripts/test.sh: warning: only ${free_mb} MB free in ${scratch}; the suite needs about 3 GB there" >&2
fi
pytest "$@"
