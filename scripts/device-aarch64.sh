#!/usr/bin/env bash
# The device install and a short training run on aarch64, emulated by qemu-user, offline after the
# first download; the aarch64 run must agree with the same run on this x86 machine.
#
#   bash scripts/device-aarch64.sh [OUTPUT]   (default: benchmarks/results/device_aarch64.json)
#
# What it does (every download is cached under .cache/device-aarch64/, so a rerun is offline):
#   1. qemu-user-static from Debian (apt-get, root) -- the emulator (a Cortex-A72, a Raspberry Pi 4's
#      core), called explicitly: nothing is registered with the kernel (binfmt_misc);
#   2. Debian bookworm's arm64 CPython 3.11 and the libraries it links, as .debs unpacked into a
#      sysroot (apt-get download with its own package lists: the host's dpkg is left alone);
#   3. aarch64 wheels of the device install from PyPI (`pip download --platform`), pinned to the
#      versions of the workstation venv so both machines run the same numpy and onnxruntime;
#   4. a fresh aarch64 venv and the device install, `pip install .` with no index: no torch;
#   5. a tiny BERT bundle (int8) and data exported on x86 by the workstation venv, then on each
#      machine `edgepeft train` (6 epochs of 96 rows, 1 thread, seed 0), `edgepeft infer` and a logits probe;
#   6. scripts/device_compare.py: the logged losses, trained deltas and logits agree within float
#      tolerance; the comparison (and the timings) is written to OUTPUT.
# It takes a few minutes (the emulated pip install is most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR="$PWD"
OUTPUT="${1:-benchmarks/results/device_aarch64.json}"
WS_PY="$ROOT_DIR/${EDGEPEFT_VENV:-.venv}/bin/python"
CACHE="$ROOT_DIR/.cache/device-aarch64"
SYSROOT="$CACHE/sysroot"
WHEELS="$CACHE/wheels"
RUN="$CACHE/run"
mkdir -p "$CACHE/debs" "$CACHE/lists/partial" "$WHEELS"
log() { echo "[device-aarch64] $*" >&2; }

# 1. the emulator
if ! command -v qemu-aarch64-static >/dev/null; then
  log "installing qemu-user-static"
  apt-get update -qq && apt-get install -y -qq qemu-user-static >/dev/null
fi

# 2. an aarch64 CPython: Debian's own arm64 packages, unpacked (not installed) into a sysroot
DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6 zlib1g
  libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5 libzstd1 libsqlite3-0 libuuid1 libncursesw6 libtinfo6
  libreadline8 libdb5.3 libgdbm6 libcrypt1 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3
  libkrb5support0 libkeyutils1 libcom-err2"
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  APT_ARM64=(-oAPT::Architecture=arm64 -oAPT::Architectures=arm64 -oDir::State::Lists="$CACHE/lists"
             -oDir::Cache::pkgcache= -oDir::Cache::srcpkgcache=)
  if ! ls "$CACHE"/debs/python3.11-minimal_*_arm64.deb >/dev/null 2>&1; then
    log "downloading Debian arm64 CPython packages"
    apt-get "${APT_ARM64[@]}" update -qq
    # shellcheck disable=SC2086
    (cd "$CACHE/debs" && apt-get "${APT_ARM64[@]}" download $DEBS 2>&1 | grep -v -e unsandboxed -e '^Get:' || true)
  fi
  rm -rf "$SYSROOT.tmp" && mkdir -p "$SYSROOT.tmp"
  for deb in "$CACHE"/debs/*.deb; do dpkg-deb -x "$deb" "$SYSROOT.tmp"; done
  mv "$SYSROOT.tmp" "$SYSROOT.new" && rm -rf "$SYSROOT" && mv "$SYSROOT.new" "$SYSROOT"
fi

# What the emulated process reads about its CPU: qemu-user shows it the host's x86 /proc/cpuinfo, on
# which onnxruntime's cpuinfo (parsing it as ARM) crashes at import. qemu's -L prefix serves these
# files from the sysroot instead: one Cortex-A72 core (a Raspberry Pi 4's), the CPU qemu emulates.
mkdir -p "$SYSROOT/proc" "$SYSROOT/sys/devices/system/cpu"
printf 'processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' \
  > "$SYSROOT/proc/cpuinfo"
echo 0 > "$SYSROOT/sys/devices/system/cpu/possible"
echo 0 > "$SYSROOT/sys/devices/system/cpu/present"
QEMU=(qemu-aarch64-static -cpu cortex-a72 -L "$SYSROOT")

# 3. aarch64 wheels of the device install, the same versions as the workstation venv
pin() { "$WS_PY" -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
REQS=("$(pin numpy)" "$(pin onnxruntime)" "$(pin safetensors)" "$(pin tokenizers)" "$(pin click)" "$(pin httpx)"
      "backports.zstd" "setuptools>=68" "pip")
if [ ! -f "$WHEELS/.complete" ] || [ "$(cat "$WHEELS/.complete")" != "${REQS[*]}" ]; then
  log "downloading aarch64 wheels: ${REQS[*]}"
  "$WS_PY" -m pip download -q --disable-pip-version-check -d "$WHEELS" --only-binary=:all: \
    --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --python-version 3.11 \
    --implementation cp "${REQS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  echo "${REQS[*]}" > "$WHEELS/.complete"
fi

# 4. a fresh aarch64 venv; its python is a wrapper that starts the arm64 interpreter under qemu
#    (argv[0] kept, so Python finds pyvenv.cfg; pip's build subprocesses go through it too)
VENV="$CACHE/venv"
rm -rf "$VENV"
"${QEMU[@]}" "$SYSROOT/usr/bin/python3.11" -m venv --without-pip "$VENV"
rm "$VENV/bin/python3.11"
cat > "$VENV/bin/python3.11" <<EOF
#!/bin/sh
exec qemu-aarch64-static -cpu cortex-a72 -L "$SYSROOT" -0 "\$0" "$SYSROOT/usr/bin/python3.11" "\$@"
EOF
chmod +x "$VENV/bin/python3.11"
log "aarch64 interpreter: $("$VENV/bin/python" -c 'import platform; print(platform.machine(), platform.python_version())')"
t0=$(date +%s)
"$VENV/bin/python" "$(ls "$WHEELS"/pip-*.whl | head -1)/pip" install -q --disable-pip-version-check --no-index \
  --find-links "$WHEELS" pip
log "device install: pip install . (offline, aarch64)"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" "${REQS[@]:0:6}" . \
  > "$CACHE/pip-install.log" 2>&1 || { cat "$CACHE/pip-install.log"; exit 1; }
INSTALL_S=$(( $(date +%s) - t0 ))
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then echo "FAIL: the device install pulled torch"; exit 1; fi
VENV_MB=$(du -sm "$VENV" | cut -f1)

# 5. the same bundle, data and run on both machines
rm -rf "$RUN" && mkdir -p "$RUN/x86_64" "$RUN/aarch64"
"$WS_PY" - "$RUN" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny_models import make_model
from edgepeft.exporters.export import export_bundle
run = Path(sys.argv[1])
export_bundle(make_model("bert", run / "model"), run / "bundle", quantize="int8", rank=4)
for name, rows, offset in (("train", 96, 0), ("val", 30, 500)):  # label k: most words from the k-th third
    with open(run / f"{name}.jsonl", "w") as f:
        for i in range(offset, offset + rows):
            label, n = i % 3, 4 + i % 5
            words = [f"w{30 * label + (i * 7 + k * 11) % 30}" if k % 4 else f"w{(i * 13 + k) % 90}" for k in range(n)]
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
PY
run_on() {  # run_on ARCH VENV: train, infer and probe with that venv's `edgepeft` and python
  local out="$RUN/$1" bin="$2/bin" t
  t=$(date +%s%N)
  "$bin/edgepeft" train "$RUN/bundle" --data "$RUN/train.jsonl" --val "$RUN/val.jsonl" --epochs 6 \
    --batch-size 8 --lr 5e-2 --threads 1 --seed 0 -o "$out/trained.delta" >"$out/train.log" 2>&1 \
    || { cat "$out/train.log"; exit 1; }
  echo $(( ($(date +%s%N) - t) / 1000000 )) > "$out/train_ms"
  "$bin/edgepeft" infer "$RUN/bundle" --delta "$out/trained.delta" "w1 w2 w3" "w40 w41" > "$out/infer.log"
  "$bin/python" scripts/device_compare.py probe "$RUN/bundle" "$out/trained.delta" "$RUN/val.jsonl" > "$out/probe.json"
}
log "x86_64 run"
run_on x86_64 "$(dirname "$(dirname "$WS_PY")")"
log "aarch64 run (emulated)"
run_on aarch64 "$VENV"
cat "$RUN/aarch64/train.log" "$RUN/aarch64/infer.log" >&2

# 6. agreement, plus what it took
"$WS_PY" scripts/device_compare.py compare "$RUN/x86_64" "$RUN/aarch64" > "$RUN/compare.json"
"$WS_PY" - "$RUN" "$OUTPUT" "$INSTALL_S" "$VENV_MB" <<'PY'
import json, sys
from pathlib import Path
run, out = Path(sys.argv[1]), Path(sys.argv[2])
result = json.loads((run / "compare.json").read_text())
result["command"] = "bash scripts/device-aarch64.sh"
result["emulator"] = "qemu-aarch64-static -cpu cortex-a72 (Debian's qemu-user-static), Debian bookworm's arm64 CPython"
result["device_install_seconds"] = int(sys.argv[3])
result["device_venv_mb"] = int(sys.argv[4])
result["train_seconds"] = {a: round(int((run / a / "train_ms").read_text()) / 1000, 1) for a in ("x86_64", "aarch64")}
result["infer_aarch64"] = (run / "aarch64" / "infer.log").read_text().splitlines()
out.write_text(json.dumps(result, indent=1) + "\n")
PY
log "wrote $OUTPUT"
"$WS_PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r[k] for k in ('agree','max_abs_loss_diff','max_rel_delta_diff','max_abs_logit_diff','train_seconds','device_install_seconds')})" "$OUTPUT"
