"""EfficientNet-Lite0 (ImageNet) adapted on the device to Fashion-MNIST, beside torch + PEFT running the same method.

Two methods, each with the fresh 10-class head: LoRA r=8 on the 1x1 convolutions of the top blocks and
the head convolution (PEFT's lora.Conv2d), and BatchNorm tuning (γ and β, running statistics frozen)
of the same blocks. edgepeft trains an int8 bundle with numpy + onnxruntime; torch trains the fp32
model (PEFT for LoRA, on the package's 1x1 convolutions rebuilt as plain nn.Conv2d with the same weights, as
PEFT cannot re-instantiate the package's padding conv class; for BN tuning plain torch with those γ, β
trainable, as PEFT has no such method),
from the SAME start (edgepeft's fresh delta loaded into PEFT's lora_A/lora_B and the same head) on the
SAME batches in the same order (the edgepeft child writes them; the torch child replays them), both
in eval mode (BatchNorm statistics frozen), no augmentation, AdamW without weight decay, linear decay,
clipping 1.0. Fashion-MNIST's 28x28 gray images are resized to 64x64 and repeated to RGB (64 px: what
two shared cores afford; the model takes any size). Every run is its own process, which reports its
peak RSS; time to accuracy counts training steps only, timed the same way on both sides (benchmarks/cnn_children.py:
not edgepeft's session building, not torch's warm-up pass, no evaluation).

    python benchmarks/bench_vision.py [--quick] [--steps 60] [--train 2000] [--test 500] [--size 64] [--top-blocks 4] [--methods ...] [--threads N] [--data-parallel N] [--out NAME]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from edgepeft.demo.assets import FASHION_LABELS, FASHION_MNIST  # noqa: E402
import cnn_children  # noqa: E402
from common import CACHE, exporter_version, results_version, run_child, write_result  # noqa: E402

FASHION = FASHION_MNIST
LABELS = list(FASHION_LABELS)
METHODS = {"bn + head": "bn+head", "lora r=8 + head": "lora+head"}
TARGET_ACCURACY = 0.75  # time to this test accuracy

COMMON = """
import json, sys, time
import numpy as np
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.image_data import load_image_dataset
bundle, args = open_bundle(sys.argv[1]), json.loads(sys.argv[2])
def take(path, n, seed):
    ds = load_image_dataset(path, bundle.manifest)
    return ds.subset(np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False)))
train = take(args["train_file"], args["train"], 0)
test = take(args["test_file"], args["test"], 1)
"""

EDGEPEFT_CHILD = COMMON + cnn_children.EDGEPEFT

TORCH_CHILD = COMMON + """
import torch
from torch import nn
from edgepeft.runtime.weights import read_frozen
from efficientnet_lite_pytorch import EfficientNet
torch.set_num_threads(args["threads"] or __import__("os").cpu_count())  # as the edgepeft child
model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=args["weights"])
model._fc = nn.Linear(model._fc.in_features, len(bundle.manifest.labels))
for name, mod in list(model.named_modules()):  # PEFT cannot rebuild the package's padding conv class: its 1x1
    if type(mod).__name__ == "Conv2dStaticSamePadding" and mod.kernel_size == (1, 1):  # convs are plain convs
        plain = nn.Conv2d(mod.in_channels, mod.out_channels, 1, stride=mod.stride, bias=mod.bias is not None)
        plain.load_state_dict({k: v for k, v in mod.state_dict().items() if not k.startswith("static_padding")})
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain)
frozen = read_frozen(bundle)  # the same fresh head as the bundle's
with torch.no_grad():
    model._fc.weight.copy_(torch.from_numpy(np.array(frozen["_fc.weight"]))); model._fc.bias.copy_(torch.from_numpy(np.array(frozen["_fc.bias"])))
""" + cnn_children.TORCH


def weights_file() -> Path:
    from edgepeft.demo.assets import efficientnet_lite0_weights

    return efficientnet_lite0_weights()


def bundle(method: str, size: int, top: int) -> Path:
    """The int8 EfficientNet-Lite0 bundle for ``method``, exported once per exporter version into benchmarks/.cache."""
    out = CACHE / f"effnet-lite0-{method.replace('+', '_')}-{size}px-top{top}-x{exporter_version()}"
    if not (out / "manifest.json").is_file():
        from edgepeft.exporters.vision_specs import export_vision

        print(f"exporting {out.name} (once)", file=sys.stderr, flush=True)
        export_vision("efficientnet-lite0", weights_file(), out, labels=LABELS, size=size, method=method,
                      method_config={"lora.rank": 8} if "lora" in method else {}, top_layers=top, quantize="int8",
                      progress=lambda m: print("  " + m, file=sys.stderr, flush=True))
    return out


def time_to(curve: list[list[float]], target: float) -> float | None:
    """Training seconds at the first evaluation at or above ``target`` (None: never reached)."""
    return next((t for _, t, acc in curve if acc >= target), None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--top-blocks", type=int, default=4)
    ap.add_argument("--every", type=int, default=20, help="Evaluate on the test images every N steps.")
    ap.add_argument("--budget", type=float, default=180, help="edgepeft's --memory-budget (MB): micro-batches and the "
                    "capped shared arena as the plan chooses; 0: none (edgepeft train's default).")
    ap.add_argument("--methods", default=",".join(METHODS), help="Which methods to run now (comma-separated); the "
                    "others are taken from earlier runs with the same settings, so two processes may split the work.")
    ap.add_argument("--threads", type=int, default=0, help="Intra-op threads of both sides (0: the cores' count, "
                    "torch's default).")
    ap.add_argument("--data-parallel", type=int, default=0, help="edgepeft's --data-parallel: micro-batches run at once, "
                    "the threads shared among them (0: edgepeft's default, one per thread; torch runs its batch on all "
                    "its intra-op threads)")
    ap.add_argument("--out", default="", help="Result name under benchmarks/results (default: vision, or vision_quick).")
    ap.add_argument("--quick", action="store_true", help="A smoke run: 10 steps on 200 images.")
    ap.add_argument("--fresh", action="store_true", help="Measure again even where this code and these settings have a "
                    "cached result (a repeat run, e.g. --fresh --out vision_run2).")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.train, a.test, a.every = 10, 200, 200, 5
    CACHE.mkdir(exist_ok=True)
    load = [round(os.getloadavg()[0], 1)]
    settings = {k: v for k, v in vars(a).items() if k not in ("quick", "methods", "out", "fresh") and (k != "threads" or v)
                and (k != "data_parallel" or v)}
    rows = []
    for name, method in METHODS.items():
        b = bundle(method, a.size, a.top_blocks) if name in a.methods.split(",") else None
        done = CACHE / f"vision-{method}-{results_version()}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]}.json"
        if b is not None and (a.fresh or not done.is_file()):
            tag = method.replace("+", "_")
            common = {"train_file": str(FASHION / "train-images-idx3-ubyte.gz"), "test_file": str(FASHION / "t10k-images-idx3-ubyte.gz"),
                      "train": a.train, "test": a.test, "steps": a.steps, "batch": a.batch, "lr": a.lr, "every": a.every,
                      "start": str(CACHE / f"vision-start-{tag}.delta"), "order": str(CACHE / f"vision-order-{tag}.json"),
                      "weights": str(weights_file()), "threads": a.threads, "budget": a.budget,
                      "data_parallel": a.data_parallel}
            ours = run_child(EDGEPEFT_CHILD, str(b), json.dumps(common))
            print(f"{name}: edgepeft {ours['test_accuracy']:.4f}, {ours['step_s']:.3f} s/step, {ours['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
            theirs = run_child(TORCH_CHILD, str(b), json.dumps(common))
            print(f"{name}: torch    {theirs['test_accuracy']:.4f}, {theirs['step_s']:.3f} s/step, {theirs['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
            from edgepeft.manifest import read_manifest

            done.write_text(json.dumps({"method": name, "bundle_method": method, "trainable": read_manifest(b).trainable_numbers,
                                        "edgepeft": _side(ours), "torch_peft": _side(theirs)}))
        if done.is_file():
            rows.append(json.loads(done.read_text()))
    if len(rows) < len(METHODS):
        print(f"{len(rows)} of {len(METHODS)} methods measured with these settings; results written when all are", file=sys.stderr)
        return
    payload = {"model": "EfficientNet-Lite0 (ImageNet), int8 bundle vs fp32 torch", "data": "Fashion-MNIST",
               "load_average_1min": load + [round(os.getloadavg()[0], 1)], "settings": settings, "quick": a.quick, "target_accuracy": TARGET_ACCURACY, "rows": rows, "targets": targets(rows)}
    path = write_result(a.out or ("vision_quick" if a.quick else "vision"), payload)
    print(table(payload))
    print(f"wrote {path}")


def _side(r: dict) -> dict:
    return {"test_accuracy": round(r["test_accuracy"], 4), "step_s": round(r["step_s"], 4), "train_s": round(r["train_s"], 2),
            "cpu_step_s": round(r["cpu_step_s"], 4), "cpu_train_s": round(r["cpu_train_s"], 2), "threads": r["threads"],
            "peak_rss_mb": round(r["peak_rss_mb"], 1), "curve": [[s, round(t, 2), round(acc, 4)] for s, t, acc in r["curve"]],
            "time_to_target_s": None if (t := time_to(r["curve"], TARGET_ACCURACY)) is None else round(t, 2),
            **({"memory_plan": r["memory_plan"]} if "memory_plan" in r else {})}


def table(payload: dict) -> str:
    """README's Vision table (tests/test_readme_figures.py checks README against it)."""
    target = f"{100 * payload['target_accuracy']:.0f} %"
    out = [f"| method | test acc. edgepeft / torch + PEFT | gap (pts) | time to {target} (ours / torch) | s/step (ours / torch) "
           "| CPU s/step (ours / torch) | peak RSS MB (ours / torch) |", "|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        e, t, g = r["edgepeft"], r["torch_peft"], payload["targets"][r["method"]]
        tt = "not reached" if g["time_to_accuracy_ratio"] is None else \
            f"{e['time_to_target_s']:.0f} s / {t['time_to_target_s']:.0f} s = {g['time_to_accuracy_ratio']:.2f}×"
        out.append(f"| {r['method']} | {100 * e['test_accuracy']:.1f} % / {100 * t['test_accuracy']:.1f} % | "
                   f"{g['accuracy_gap_points']:+.1f} | {tt} | {e['step_s']:.3f} / {t['step_s']:.3f} = {g['step_time_ratio']:.2f}× | "
                   f"{e['cpu_step_s']:.3f} / {t['cpu_step_s']:.3f} = {g['cpu_step_ratio']:.2f}× | "
                   f"{e['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} = {g['peak_memory_ratio']:.2f}× |")
    return "\n".join(out)


def targets(rows: list[dict]) -> dict:
    """The three targets, per method: accuracy gap (points), peak memory ratio, time-to-accuracy ratio."""
    out = {}
    for r in rows:
        e, t = r["edgepeft"], r["torch_peft"]
        tt = None if e["time_to_target_s"] is None or t["time_to_target_s"] is None else round(e["time_to_target_s"] / t["time_to_target_s"], 3)
        out[r["method"]] = {"accuracy_gap_points": round(100 * (e["test_accuracy"] - t["test_accuracy"]), 2),
                            "peak_memory_ratio": round(e["peak_rss_mb"] / t["peak_rss_mb"], 3),
                            "time_to_accuracy_ratio": tt, "step_time_ratio": round(e["step_s"] / t["step_s"], 3),
                            **({"cpu_step_ratio": round(e["cpu_step_s"] / t["cpu_step_s"], 3)} if "cpu_step_s" in e else {})}
    return out


if __name__ == "__main__":
    main()
