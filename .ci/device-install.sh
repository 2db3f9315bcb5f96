#!/usr/bin/env bash
# The device install, for real: `pip install .` (no extras) in a fresh venv must not pull torch,
# and must train a delta on a bundle exported by the workstation venv.
set -euo pipefail
cd "$(dirname "$0")/.."
WS_PY="${EDGEPEFT_VENV:-.venv}/bin/python"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "device install check in $TMP"
"$WS_PY" - "$TMP" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny_models import make_model
from edgepeft.exporters.export import export_bundle
tmp = Path(sys.argv[1])
export_bundle(make_model("bert", tmp), tmp / "bundle", quantize="int8", rank=4)
with open(tmp / "data.jsonl", "w") as f:
    for i in range(48):
        f.write(json.dumps({"text": " ".join(f"w{(i * 7 + k) % 90}" for k in range(6)), "label": i % 3}) + "\n")
PY
python3 -m venv "$TMP/device"
"$TMP/device/bin/pip" install -q --disable-pip-version-check . 2>&1 | grep -v "^WARNING: Location" || true
if "$TMP/device/bin/python" -c "import torch" 2>/dev/null; then
  echo "FAIL: the device install pulled torch"; exit 1
fi
SIZE=$(du -sm "$TMP/device" | cut -f1)
"$TMP/device/bin/edgepeft" train "$TMP/bundle" --data "$TMP/data.jsonl" --max-steps 6 --batch-size 8 -o "$TMP/out.delta"
"$TMP/device/bin/edgepeft" infer "$TMP/bundle" --delta "$TMP/out.delta" "w1 w2 w3"
echo "device install: ${SIZE} MB, no torch, trained and inferred: ok"
