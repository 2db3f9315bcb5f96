#!/usr/bin/env bash
# Hub uploads (bench_hub.py --uploads-only) of the code at REF and of this tree, back to back on one machine:
# benchmarks/results/hub_uploads_s5.json (REF, default 31bc7d1: the hub as session 5 left it) and hub_uploads.json.
#
#   bash scripts/bench_hub_before_after.sh [REF]
#
# REF runs from a `git archive` export in this tree's venv (PYTHONPATH puts it ahead of the installed edgepeft).
set -euo pipefail
ref="${1:-31bc7d1}"
root="$(cd "$(dirname "$0")/.." && pwd)"
before="$(mktemp -d)"
trap 'rm -rf "$before"' EXIT
git -C "$root" archive "$ref" | tar -x -C "$before"
(cd "$before" && PYTHONPATH="$before" python benchmarks/bench_hub.py --uploads-only)
python - "$before/benchmarks/results/hub_uploads.json" "$root/benchmarks/results/hub_uploads_s5.json" "$ref" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
result["code"] = f"{sys.argv[3]}, run from an export of that commit in this tree's venv, just before hub_uploads.json"
open(sys.argv[2], "w").write(json.dumps(result, indent=1) + "\n")
PY
cd "$root" && python benchmarks/bench_hub.py --uploads-only
