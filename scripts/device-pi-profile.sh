#!/usr/bin/env bash
# A Raspberry-Pi-like profile on this machine: the real short training run (all-MiniLM-L6-v2 int8
# bundle, 1,200 Rotten Tomatoes rows x 2 epochs, as tests/test_real_minilm_train.py) on ONE core
# with a hard memory cap that the kernel enforces (a memory cgroup: exceeding it is an OOM kill,
# not a warning), and `--memory-budget` set below the cap so the trainer plans to fit.
#
#   bash scripts/device-pi-profile.sh [OUTPUT]   (default: benchmarks/results/device_pi.json)
#   PI_CAP_MB=300 PI_BUDGET_MB=250 bash scripts/device-pi-profile.sh   (the defaults)
#
# Needs root (it creates a cgroup under this process's own memory cgroup, v1 or v2), the workstation
# venv for the one-time export (cached in benchmarks/.cache) and the demo assets (scripts/setup.sh).
# Reports steps/s, the trainer's peak RSS, the cgroup's own peak, OOM events and test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT="${1:-benchmarks/results/device_pi.json}"
CAP_MB="${PI_CAP_MB:-300}"
BUDGET_MB="${PI_BUDGET_MB:-250}"
PY="${EDGEPEFT_VENV:-.venv}/bin/python"
EDGEPEFT="${EDGEPEFT_VENV:-.venv}/bin/edgepeft"
WORK="$(mktemp -d)"
log() { echo "[device-pi] $*" >&2; }

# The cgroup: a child of the memory cgroup this shell is in (v1: the "memory" hierarchy; v2: unified).
if [ -d /sys/fs/cgroup/memory ]; then
  CG="/sys/fs/cgroup/memory$(awk -F: '$2 == "memory" {print $3}' /proc/self/cgroup)/edgepeft-pi-$$"
  mkdir "$CG"
  echo $((CAP_MB << 20)) > "$CG/memory.limit_in_bytes"
  [ -f "$CG/memory.memsw.limit_in_bytes" ] && echo $((CAP_MB << 20)) > "$CG/memory.memsw.limit_in_bytes"  # no swap either
  PEAK_FILE="$CG/memory.max_usage_in_bytes"; EVENTS() { grep -E '^oom_kill ' "$CG/memory.oom_control" | awk '{print $2}'; }
else
  CG="/sys/fs/cgroup$(awk -F: '$1 == "0" {print $3}' /proc/self/cgroup)/edgepeft-pi-$$"
  mkdir "$CG"
  echo $((CAP_MB << 20)) > "$CG/memory.max"
  echo 0 > "$CG/memory.swap.max"
  PEAK_FILE="$CG/memory.peak"; EVENTS() { awk '$1 == "oom_kill" {print $2}' "$CG/memory.events"; }
fi
cleanup() { rm -rf "$WORK"; rmdir "$CG" 2>/dev/null || true; }
trap cleanup EXIT
log "cgroup $CG: memory capped at $CAP_MB MB; CPU: core 0 only, 1 onnxruntime thread"
# capped CMD...: run CMD inside the cgroup, pinned to one core, one thread for every thread pool
capped() {
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 sh -c 'echo $$ > "$0/cgroup.procs" && exec taskset -c 0 "$@"' "$CG" "$@"
}

# The bundle (workstation side, outside the cap) and the data: the real short run's.
"$PY" - "$WORK" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import minilm_bundle
from edgepeft.demo.assets import rotten_tomatoes_split, write_jsonl
work = Path(sys.argv[1])
split = rotten_tomatoes_split(0)
write_jsonl(work / "train.jsonl", split["train"][:1200])
write_jsonl(work / "test.jsonl", split["test"])
(work / "exported").symlink_to(minilm_bundle("int8", "lora+bitfit"))
PY

# the device's own copy, made inside the cgroup: its page cache counts against the cap, as on a device
# (the workstation's cached export is charged to the workstation's cgroup)
capped cp -rL "$WORK/exported" "$WORK/bundle"
log "training under the cap (2 epochs of 1,200 rows, batch 16, --memory-budget $BUDGET_MB)"
capped "$EDGEPEFT" train "$WORK/bundle" --data "$WORK/train.jsonl" -o "$WORK/rt.delta" --epochs 2 --batch-size 16 \
  --lr 2e-3 --warmup 0.06 --seed 0 --threads 1 --memory-budget "$BUDGET_MB" -q | tee "$WORK/train.out" >&2
TRAIN_PEAK=$(cat "$PEAK_FILE")
capped "$EDGEPEFT" eval "$WORK/bundle" --data "$WORK/test.jsonl" --threads 1 > "$WORK/base.out"
capped "$EDGEPEFT" eval "$WORK/bundle" --data "$WORK/test.jsonl" --threads 1 --delta "$WORK/rt.delta" > "$WORK/mine.out"
cat "$WORK/mine.out" >&2

"$PY" - "$WORK" "$OUTPUT" "$CAP_MB" "$BUDGET_MB" "$TRAIN_PEAK" "$(cat "$PEAK_FILE")" "$(EVENTS)" <<'PY'
import json, os, re, sys
from datetime import datetime, timezone
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import machine
work, out = Path(sys.argv[1]), Path(sys.argv[2])
cap, budget, train_peak, all_peak, ooms = (int(x) for x in sys.argv[3:8])
train = (work / "train.out").read_text()
acc = lambda name: float(re.search(r"^accuracy\s+(\S+)$", (work / name).read_text(), re.M).group(1))
steps, seconds, rate = re.search(r"trained (\d+) steps .* in ([\d.]+) s, ([\d.]+) steps/s", train).groups()
result = {
    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    "machine": machine(),
    "benchmark": "Raspberry-Pi-like profile: all-MiniLM-L6-v2 int8, Rotten Tomatoes 1,200 rows x 2 epochs, batch 16",
    "command": "bash scripts/device-pi-profile.sh",
    "profile": {"cpu": "taskset -c 0, --threads 1, OMP/OpenBLAS 1 thread",
                "memory": "memory cgroup limit (swap included), enforced by the kernel"},
    "memory_cap_mb": cap,
    "memory_budget_mb": budget,
    "steps": int(steps),
    "train_seconds": float(seconds),
    "steps_per_s": float(rate),
    "peak_rss_mb": float(re.search(r"peak memory ([\d.]+) MB", train).group(1)),
    "memory_plan": re.search(r"peak memory [\d.]+ MB \((.*)\)", train).group(1),
    "cgroup_peak_mb_training": round(train_peak / 2**20, 1),
    "cgroup_peak_mb_with_eval": round(all_peak / 2**20, 1),
    "oom_kills": ooms,
    "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # other work on the machine
    "test_accuracy": acc("mine.out"),
    "base_test_accuracy": acc("base.out"),
}
out.write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result, indent=1))
PY
log "wrote $OUTPUT"
