#!/usr/bin/env bash
# The main job on a fresh machine: creates .venv when missing, then runs `magnet demo`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
magnet demo "$@"
