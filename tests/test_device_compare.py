"""scripts/device_compare.py, the check behind scripts/device-aarch64.sh: two runs agree only when their
logged losses, trained deltas and logits all do (so the CI step can fail)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from edgepeft.delta import Delta, DeltaMeta, save_delta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import device_compare  # noqa: E402

LOG = ("step 1/2  epoch 1  loss {a:.4f}  lr 1.00e-02  9.00 steps/s  left 0:00\n"
       "step 2/2  epoch 1  loss 0.9000  lr 5.00e-03  9.00 steps/s  left 0:00\n"
       "validation before: accuracy 33.3 %, loss 1.0992\nvalidation after:  accuracy 70.0 %, loss 0.7046\n")


def _run(folder: Path, *, loss: float = 1.1, b: float = 0.5, logit: float = 0.25) -> Path:
    folder.mkdir()
    (folder / "train.log").write_text(LOG.format(a=loss))
    tensors = {"classifier.bias": np.array([b, -b, 0.0], np.float32)}
    save_delta(folder / "trained.delta", Delta(tensors, DeltaMeta(base_fingerprint="0" * 64, method="bitfit")))
    probe = {"machine": folder.name, "python": "3.11", "numpy": "2", "onnxruntime": "1",
             "logits": [[logit, 0.0, -logit], [0.0, logit, 0.1]]}
    (folder / "probe.json").write_text(json.dumps(probe))
    return folder


def test_identical_runs_agree(tmp_path):
    r = device_compare.compare(_run(tmp_path / "x86_64"), _run(tmp_path / "aarch64"))
    assert r["agree"] and r["max_abs_loss_diff"] == 0 and r["val_accuracy_pct_before_after"]["device"] == (33.3, 70.0)


def test_a_float_rounding_difference_still_agrees(tmp_path):
    r = device_compare.compare(_run(tmp_path / "x86_64"), _run(tmp_path / "aarch64", b=0.5 + 1e-7, logit=0.25 + 1e-6))
    assert r["agree"]


def test_a_different_loss_delta_or_logit_disagrees(tmp_path):
    ref = _run(tmp_path / "x86_64")
    for name, kw in {"loss": {"loss": 1.2}, "delta": {"b": 0.6}, "logit": {"logit": 0.3}}.items():
        assert not device_compare.compare(ref, _run(tmp_path / name, **kw))["agree"], name
