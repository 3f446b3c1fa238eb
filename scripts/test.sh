#!/usr/bin/env bash
# The test command of the README: sets up .venv, builds miss_ext, runs the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k dropout).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$repo/scripts/setup_env.sh"
cd "$repo"
# Sleeping rather than spinning OpenMP threads: the suite runs subprocesses (DDP) and shares
# two cores; see scripts/demo.sh. Set OMP_WAIT_POLICY to override.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
python -m pytest tests -q "$@"
