#!/usr/bin/env bash
# Set up, then run the main job: export all-MiniLM-L6-v2, start a local hub, three devices train on
# their own Rotten Tomatoes shards, push, the hub aggregates, devices pull; accuracy at every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${EDGEPEFT_VENV:-.venv}/bin/activate"
edgepeft demo "$@"
