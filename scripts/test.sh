#!/usr/bin/env bash
# The whole test suite on a fresh machine: creates .venv when missing, then lint + pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
ruff check .
pytest "$@"
