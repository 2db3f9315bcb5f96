"""Keyword spotting personalized on the device: a KWS CNN trained on the workstation on 16 espeak-ng speakers
adapts to a voice it never heard, beside torch + PEFT running the same method.

The base (exporters/kws_cnn.py, 64k parameters, 10 words) is trained in torch on log-mel features of the
base speakers' clips (benchmarks/speech_data.py: four English accents x four variants, random speed, pitch,
onset and noise), then exported to int8 bundles that keep its trained classifier. The device's owner speaks
with NEW_VOICE: the device trains on a few of its clips per word and is tested on others. Two methods, each
with the head: LoRA r=8 on every convolution (PEFT's lora.Conv2d) and BatchNorm tuning (γ, β; statistics
frozen; plain torch, as PEFT has no such method). edgepeft trains the int8 bundle with numpy + onnxruntime;
torch trains the fp32 model from the same start (edgepeft's fresh delta) on the same batches in the same
order, both in eval mode, AdamW without weight decay, linear decay, clipping 1.0; edgepeft with a memory budget
(``--budget``, what ``edgepeft train --memory-budget`` sets: glibc returns freed activations, no onnxruntime
arena; the batch stays whole), each side on one thread (two cores shared with other jobs make two-thread
timings noise). Every run is its own
process, which reports its peak RSS; time to accuracy counts training steps only (not edgepeft's session
building and memory probes, not torch's model loading and one warm-up pass). Both read the WAV folders
through the device's reader (runtime/audio_data.py), so both see the same features.

    python benchmarks/bench_speech.py [--quick] [--steps 60] [--per-word 8] [--methods ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import speech_data as S  # noqa: E402
from bench_vision import targets  # noqa: E402
from common import CACHE, exporter_version, run_child, write_result  # noqa: E402

METHODS = {"bn + head": "bn+head", "lora r=8 + head": "lora+head"}
TARGET_ACCURACY = 0.90  # time to this test accuracy on the new voice

COMMON = """
import json, sys, time
import numpy as np
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.audio_data import load_audio_dataset
bundle, args = open_bundle(sys.argv[1]), json.loads(sys.argv[2])
train = load_audio_dataset(args["train_dir"], bundle.manifest)
test = load_audio_dataset(args["test_dir"], bundle.manifest)
"""

EDGEPEFT_CHILD = COMMON + """
from edgepeft.delta import Delta, delta_from_init, save_delta
from edgepeft.runtime.evaluate import evaluate
from edgepeft.runtime.bundle import SessionConfig
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.trainer import TrainConfig, Trainer
used = []  # each step's clips, for the torch child to replay (one batch however the memory plan splits it)
start = delta_from_init(bundle.manifest, 0)
save_delta(args["start"], start)
predictor = Predictor(bundle, SessionConfig(threads=1, arena=False))
before = evaluate(predictor, test, [start], batch_size=args["batch"])["accuracy"]
curve, step_times, t_train = [], [], 0.0
cfg = TrainConfig(epochs=1000, max_steps=args["steps"], batch_size=args["batch"], lr=args["lr"], weight_decay=0.0,
                  eval_every=0, checkpoint_every=0, seed=0, memory_budget_mb=args["budget"], threads=1)
last = [time.perf_counter()]
def progress(p):
    global t_train
    now = time.perf_counter()
    if p.metrics is None and p.step > 0:
        step_times.append(now - last[0]); t_train += now - last[0]
    last[0] = time.perf_counter()
class Probe(Trainer):  # evaluate on the test clips every `every` steps, outside the timed steps
    def _sessions(self):  # building the sessions and probing the memory plan is setup, not training
        super()._sessions()
        last[0] = time.perf_counter()
    def _step(self, group, lr):
        used.append([int(i) for index in group for i in index])
        loss = super()._step(group, lr)
        if (self.step + 1) % args["every"] == 0:
            t0 = time.perf_counter()
            acc = evaluate(predictor, test, [Delta(self.params, self.delta.meta)], batch_size=args["batch"])["accuracy"]
            curve.append([self.step + 1, t_train + (t0 - last[0]), acc])
            last[0] += time.perf_counter() - t0  # the evaluation is not training time
        return loss
res = Probe(bundle, train, cfg, on_progress=progress).fit()
json.dump(used, open(args["order"], "w"))
acc = evaluate(predictor, test, [res.delta], batch_size=args["batch"])["accuracy"]
print("RESULT", json.dumps({"before": before, "test_accuracy": acc, "curve": curve, "step_s": float(np.median(step_times)),
                            "train_s": t_train, "steps": res.summary.steps}))
"""

TORCH_CHILD = COMMON + """
import torch
from torch import nn
from edgepeft.delta import load_delta
from edgepeft.exporters.audio_specs import load_audio_model
from edgepeft.names import BIAS, BN_SCALE, INPUT_FEATURES, LABELS, LORA_A, LORA_B, WEIGHT, split_slot_name
torch.set_num_threads(1)
m = bundle.manifest
model, _, _ = load_audio_model("kws-cnn", __import__("pathlib").Path(args["weights"]))  # fp32, its trained head
for p in model.parameters():
    p.requires_grad_(False)
start = load_delta(args["start"], m, for_training=True)
lora = sorted({s.module for s in m.slots if s.kind == LORA_A})
net = model
if lora:
    from peft import LoraConfig, get_peft_model
    a0 = next(s for s in m.slots if s.kind == LORA_A)
    model = get_peft_model(model, LoraConfig(r=a0.rank, lora_alpha=a0.alpha, target_modules=lora, modules_to_save=["fc"]))
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
def accuracy():  # in batches of the training batch's size, as the edgepeft child evaluates
    with torch.no_grad():
        right = 0
        for i in range(0, len(test), args["batch"]):
            b = test.batch(np.arange(i, min(i + args["batch"], len(test))))
            right += int((model(torch.from_numpy(b[INPUT_FEATURES])).argmax(-1).numpy() == b[LABELS]).sum())
        return right / len(test)
before = accuracy()
b = train.batch(np.array(order[0]))  # one untimed warm-up pass (oneDNN builds its kernels), as edgepeft's memory
nn.functional.cross_entropy(model(torch.from_numpy(b[INPUT_FEATURES])), torch.from_numpy(b[LABELS])).backward()
opt.zero_grad()  # probes warm its session up before its timed steps; the gradients are dropped
curve, step_times, t_train = [], [], 0.0
for k, index in enumerate(order):
    t0 = time.perf_counter()
    b = train.batch(np.array(index))
    loss = nn.functional.cross_entropy(model(torch.from_numpy(b[INPUT_FEATURES])), torch.from_numpy(b[LABELS]))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step(); sched.step()
    dt = time.perf_counter() - t0
    step_times.append(dt); t_train += dt
    if (k + 1) % args["every"] == 0:
        curve.append([k + 1, t_train, accuracy()])
print("RESULT", json.dumps({"before": before, "test_accuracy": accuracy(), "curve": curve,
                            "step_s": float(np.median(step_times)), "train_s": t_train, "steps": total}))
"""


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def data_sets(a: argparse.Namespace) -> dict[str, Path]:
    """The four WAV folders (synthesized once per settings): base train and held-out, new voice train and test."""
    root = CACHE / f"speech-{_key({'base': a.base_per_word, 'per_word': a.per_word, 'test': a.test_per_word, 'v': 1})}"
    plans = {"base": S.draws(S.BASE_VOICES, a.base_per_word, 0), "base_heldout": S.draws(S.BASE_VOICES, 2, 1),
             "new_train": S.draws((S.NEW_VOICE,), a.per_word, 2), "new_test": S.draws((S.NEW_VOICE,), a.test_per_word, 3)}
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out = {name: S.write_set(root / name, plan) for name, plan in plans.items()}
    print(f"speech data in {root} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return out


def folder_features(root: Path, spec) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features (N, 1, mels, frames) and word indices of a ``word/clip.wav`` folder, as the device reads them."""
    from edgepeft.runtime.audio import log_mel, read_wav

    files = [(f, S.WORDS.index(f.parent.name)) for f in sorted(root.glob("*/*.wav"))]
    return log_mel(np.stack([read_wav(f, spec) for f, _ in files]), spec), np.array([y for _, y in files])


def base_model(sets: dict[str, Path], epochs: int) -> tuple[Path, dict]:
    """The KWS CNN trained on the base speakers (workstation, torch), saved with its feature settings; cached."""
    import torch
    from torch import nn

    from edgepeft.exporters.audio_specs import save_audio_weights
    from edgepeft.exporters.kws_cnn import KwsCnn
    from edgepeft.runtime.audio import AudioSpec

    out = CACHE / f"speech-kws-base-{sets['base'].parent.name}-e{epochs}.safetensors"
    info = out.with_suffix(".json")
    if out.is_file() and info.is_file():
        return out, json.loads(info.read_text())
    t0 = time.perf_counter()
    raw = AudioSpec()
    x, y = folder_features(sets["base"], raw)
    spec = AudioSpec(mean=round(float(x.mean()), 4), std=round(float(x.std()), 4))
    x = (x - spec.mean) / spec.std
    torch.manual_seed(0)
    model = KwsCnn(len(S.WORDS), spec.mels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // 32)):
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()

    def acc(name: str) -> float:
        fx, fy = folder_features(sets[name], spec)
        with torch.no_grad():
            return round(float((model(torch.from_numpy(fx)).argmax(-1).numpy() == fy).mean()), 4)

    save_audio_weights(model, out, labels=list(S.WORDS), features=spec.to_dict())
    meta = {"clips": len(y), "epochs": epochs, "train_s": round(time.perf_counter() - t0, 1),
            "heldout_base_voices_accuracy": acc("base_heldout"), "new_voice_accuracy": acc("new_test")}
    info.write_text(json.dumps(meta))
    return out, meta


def bundle(method: str, weights: Path) -> Path:
    """The int8 KWS bundle for ``method`` (slots in every block, the trained head kept), exported once."""
    out = CACHE / f"{weights.stem}-{method.replace('+', '_')}-x{exporter_version()}"
    if not (out / "manifest.json").is_file():
        from edgepeft.exporters.audio_specs import export_audio

        print(f"exporting {out.name} (once)", file=sys.stderr, flush=True)
        export_audio("kws-cnn", weights, out, method=method, method_config={"lora.rank": 8} if "lora" in method else {},
                     quantize="int8", progress=lambda msg: print("  " + msg, file=sys.stderr, flush=True))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--base-per-word", type=int, default=6, help="Clips per (base speaker, word).")
    ap.add_argument("--base-epochs", type=int, default=20)
    ap.add_argument("--per-word", type=int, default=8, help="The new voice's training clips per word (on the device).")
    ap.add_argument("--test-per-word", type=int, default=20, help="The new voice's test clips per word.")
    ap.add_argument("--every", type=int, default=5, help="Evaluate on the test clips every N steps.")
    ap.add_argument("--budget", type=float, default=150, help="edgepeft's --memory-budget (MB): lean allocator, "
                    "batch kept whole while its peak fits; 0: none (edgepeft train's default).")
    ap.add_argument("--out", default="speech", help="Results file name (benchmarks/results/NAME.json).")
    ap.add_argument("--methods", default=",".join(METHODS), help="Which methods to run now (comma-separated).")
    ap.add_argument("--quick", action="store_true", help="A smoke run: fewer clips and steps.")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.base_per_word, a.base_epochs, a.per_word, a.test_per_word = 10, 2, 3, 4, 5
    CACHE.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    sets = data_sets(a)
    weights, base = base_model(sets, a.base_epochs)
    print(f"base: {base}", file=sys.stderr, flush=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("quick", "methods", "out")}
    rows = []
    for name, method in METHODS.items():
        done = CACHE / f"speech-{method}-{exporter_version()}-{_key(settings)}.json"
        if name in a.methods.split(",") and not done.is_file():
            b = bundle(method, weights)
            tag = method.replace("+", "_")
            common = {"train_dir": str(sets["new_train"]), "test_dir": str(sets["new_test"]), "steps": a.steps,
                      "batch": a.batch, "lr": a.lr, "every": a.every, "weights": str(weights), "budget": a.budget,
                      "start": str(CACHE / f"speech-start-{tag}.delta"), "order": str(CACHE / f"speech-order-{tag}.json")}
            ours = run_child(EDGEPEFT_CHILD, str(b), json.dumps(common))
            print(f"{name}: edgepeft {ours['before']:.3f} -> {ours['test_accuracy']:.3f}, {ours['step_s']:.4f} s/step, "
                  f"{ours['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            theirs = run_child(TORCH_CHILD, str(b), json.dumps(common))
            print(f"{name}: torch    {theirs['before']:.3f} -> {theirs['test_accuracy']:.3f}, {theirs['step_s']:.4f} s/step, "
                  f"{theirs['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            from edgepeft.manifest import read_manifest

            done.write_text(json.dumps({"method": name, "bundle_method": method, "trainable": read_manifest(b).trainable_numbers,
                                        "edgepeft": _side(ours), "torch_peft": _side(theirs)}))
        if done.is_file():
            rows.append(json.loads(done.read_text()))
    if len(rows) < len(METHODS):
        print(f"{len(rows)} of {len(METHODS)} methods measured with these settings; results written when all are", file=sys.stderr)
        return
    payload = {"model": "KWS CNN (exporters/kws_cnn.py), int8 bundle vs fp32 torch", "words": list(S.WORDS),
               "base_voices": list(S.BASE_VOICES), "new_voice": S.NEW_VOICE, "base": base, "settings": settings,
               "quick": a.quick, "target_accuracy": TARGET_ACCURACY, "rows": rows, "targets": targets(rows),
               "wall_s": round(time.perf_counter() - t0, 1)}
    path = write_result(a.out + "_quick" if a.quick else a.out, payload)
    print(table(payload))
    print(f"wrote {path}")


def _side(r: dict) -> dict:
    t = next((t for _, t, acc in r["curve"] if acc >= TARGET_ACCURACY), None)
    return {"before": round(r["before"], 4), "test_accuracy": round(r["test_accuracy"], 4), "step_s": round(r["step_s"], 5),
            "train_s": round(r["train_s"], 3), "peak_rss_mb": round(r["peak_rss_mb"], 1),
            "curve": [[s, round(t, 3), round(acc, 4)] for s, t, acc in r["curve"]],
            "time_to_target_s": None if t is None else round(t, 3)}


def step_and_memory(payload: dict) -> str:
    """One line per method of step time and peak memory, edgepeft vs torch (README quotes the run without a budget)."""
    return "; ".join(f"{r['method']} {r['edgepeft']['step_s']:.4f} / {r['torch_peft']['step_s']:.4f} s a step = "
                     f"{g['step_time_ratio']:.2f}×, {r['edgepeft']['peak_rss_mb']:.0f} / {r['torch_peft']['peak_rss_mb']:.0f} MB "
                     f"peak = {g['peak_memory_ratio']:.2f}×" for r in payload["rows"] for g in [payload["targets"][r["method"]]])


def table(payload: dict) -> str:
    """README's speech table (tests/test_readme_figures.py checks README against it)."""
    target = f"{100 * payload['target_accuracy']:.0f} %"
    out = [f"| method | new voice before → after, edgepeft / torch + PEFT | gap (pts) | time to {target} (ours / torch) "
           "| s/step (ours / torch) | peak RSS MB (ours / torch) |", "|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        e, t, g = r["edgepeft"], r["torch_peft"], payload["targets"][r["method"]]
        tt = "not reached" if g["time_to_accuracy_ratio"] is None else \
            f"{e['time_to_target_s']:.2f} s / {t['time_to_target_s']:.2f} s = {g['time_to_accuracy_ratio']:.2f}×"
        out.append(f"| {r['method']} | {100 * e['before']:.1f} → {100 * e['test_accuracy']:.1f} % / "
                   f"{100 * t['before']:.1f} → {100 * t['test_accuracy']:.1f} % | {g['accuracy_gap_points']:+.1f} | {tt} | "
                   f"{e['step_s']:.4f} / {t['step_s']:.4f} = {g['step_time_ratio']:.2f}× | "
                   f"{e['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} = {g['peak_memory_ratio']:.2f}× |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
