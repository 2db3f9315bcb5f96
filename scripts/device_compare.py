"""Cross-machine agreement of a device run: ``probe`` (runs on the device, device install only) writes
the logits of a bundle + delta on a data file; ``compare`` (any machine) checks two runs agree.

scripts/device-aarch64.sh trains the same bundle on the same data with the same seed on x86 and on
aarch64 (qemu-user) and calls this to compare the training losses, the trained deltas and the logits.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

import numpy as np

# float32 kernels differ between x86 (AVX) and aarch64 (NEON) in summation order only: agreement to
# ~1e-6 relative is expected; these bounds leave room for an int8 rounding flip in one activation.
LOSS_TOL = 1e-3    # absolute, on the 4-decimal losses `edgepeft train` prints
DELTA_TOL = 1e-3   # max |a - b| over every delta tensor, relative to that tensor's max |a|
LOGIT_TOL = 1e-3   # max |a - b| over all logits, absolute


def probe(bundle: Path, delta: Path, data: Path) -> dict:
    """Versions of this machine's device install and the logits of bundle + delta on every row of data."""
    import onnxruntime

    from edgepeft.delta import load_delta
    from edgepeft.runtime.bundle import SessionConfig, open_bundle
    from edgepeft.runtime.infer import Predictor

    b = open_bundle(bundle)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines() if line.strip()]
    predictor = Predictor(b, SessionConfig(threads=1))
    enc = predictor.tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), width), np.int64)
    mask = np.zeros((len(enc), width), np.int64)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1
    logits = predictor.logits(ids, mask, [load_delta(delta, b.manifest)])
    return {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "logits": np.asarray(logits, np.float64).tolist()}


def train_losses(log: Path) -> list[float]:
    """The per-step losses of an `edgepeft train` log (its progress lines)."""
    return [float(m) for m in re.findall(r"loss (\d+\.\d+)  lr", log.read_text())]


def val_accuracy(log: Path) -> tuple[float, float]:
    """Validation accuracy before and after training, from an `edgepeft train` log."""
    before, after = re.findall(r"validation (?:before|after):\s+accuracy ([\d.]+) %", log.read_text())
    return float(before), float(after)


def _delta_tensors(path: Path) -> dict[str, np.ndarray]:
    from edgepeft.delta import load_delta

    return load_delta(path).tensors


def compare(ref: Path, dev: Path) -> dict:
    """Agreement of two run folders (train.log, trained.delta, probe.json each): losses, deltas, logits."""
    a, b = json.loads((ref / "probe.json").read_text()), json.loads((dev / "probe.json").read_text())
    la, lb = train_losses(ref / "train.log"), train_losses(dev / "train.log")
    if not la or len(la) != len(lb):
        raise SystemExit(f"train logs differ in steps: {len(la)} vs {len(lb)}")
    ta, tb = _delta_tensors(ref / "trained.delta"), _delta_tensors(dev / "trained.delta")
    if ta.keys() != tb.keys():
        raise SystemExit("trained deltas hold different tensors")
    delta_rel = max(float(np.abs(ta[k] - tb[k]).max() / max(np.abs(ta[k]).max(), 1e-12)) for k in ta)
    xa, xb = np.array(a["logits"]), np.array(b["logits"])
    result = {
        "reference": {k: a[k] for k in ("machine", "python", "numpy", "onnxruntime")},
        "device": {k: b[k] for k in ("machine", "python", "numpy", "onnxruntime")},
        "loss_lines_compared": len(la),  # `edgepeft train` logs about 20 progress lines a run
        "train_loss_reference": la,
        "train_loss_device": lb,
        "val_accuracy_pct_before_after": {"reference": val_accuracy(ref / "train.log"),
                                          "device": val_accuracy(dev / "train.log")},
        "max_abs_loss_diff": max(abs(x - y) for x, y in zip(la, lb)),
        "max_rel_delta_diff": delta_rel,
        "max_abs_logit_diff": float(np.abs(xa - xb).max()),
        "same_predictions": bool((xa.argmax(-1) == xb.argmax(-1)).all()),
        "tolerances": {"loss_abs": LOSS_TOL, "delta_rel": DELTA_TOL, "logit_abs": LOGIT_TOL},
    }
    result["agree"] = (result["max_abs_loss_diff"] <= LOSS_TOL and delta_rel <= DELTA_TOL
                       and result["max_abs_logit_diff"] <= LOGIT_TOL and result["same_predictions"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("probe")
    pp.add_argument("bundle", type=Path)
    pp.add_argument("delta", type=Path)
    pp.add_argument("data", type=Path)
    pc = sub.add_parser("compare")
    pc.add_argument("reference", type=Path)
    pc.add_argument("device", type=Path)
    args = p.parse_args()
    if args.cmd == "probe":
        json.dump(probe(args.bundle, args.delta, args.data), sys.stdout)
        return
    result = compare(args.reference, args.device)
    json.dump(result, sys.stdout, indent=1)
    print()
    if not result["agree"]:
        raise SystemExit("FAIL: the device run does not agree with the reference run")


if __name__ == "__main__":
    main()
