#!/usr/bin/env bash
# Set up and run every test, the slow real-model ones included (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${EDGEPEFT_VENV:-.venv}/bin/activate"
# System services some tests need: PostgreSQL (hub scale-out backend) and Chromium (status page).
if [ -f .ci/system-deps.sh ]; then bash .ci/system-deps.sh; fi
if [ -f .ci/postgres.sh ] && [ -z "${EDGEPEFT_TEST_POSTGRES:-}" ]; then
  eval "$(bash .ci/postgres.sh)"
  # the throwaway server goes when this script ends, passed, failed or interrupted
  trap 'bash .ci/postgres.sh stop "$EDGEPEFT_TEST_POSTGRES_DIR"' EXIT
fi
# One worker per core (pytest-xdist); the workers share each tiny bundle (tests/conftest.py built_once).
python -m pytest -q -p no:cacheprovider -n "${EDGEPEFT_TEST_WORKERS:-auto}" "$@"
# The device install: plain `pip install .` in a fresh venv (no torch) trains on a bundle.
if [ -f .ci/device-install.sh ]; then bash .ci/device-install.sh; fi
