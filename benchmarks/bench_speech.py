"""Keyword spotting personalized on the device: a KWS CNN trained on the workstation on 16 espeak-ng speakers
adapts to a voice it never heard, beside torch + PEFT running the same method.

The base (exporters/kws_cnn.py, 64k parameters, 10 words) is trained in torch on log-mel features of the
base speakers' clips (edgepeft/demo/speech_data.py: four English accents x four variants, random speed, pitch,
onset and noise), then exported to int8 bundles that keep its trained classifier. The device's owner speaks
with NEW_VOICE: the device trains on a few of its clips per word and is tested on others. Two methods, each
with the head: LoRA r=8 on every convolution (PEFT's lora.Conv2d) and BatchNorm tuning (γ, β; statistics
frozen; plain torch, as PEFT has no such method). edgepeft trains the int8 bundle with numpy + onnxruntime;
torch trains the fp32 model from the same start (edgepeft's fresh delta) on the same batches in the same
order, both in eval mode, AdamW without weight decay, linear decay, clipping 1.0; edgepeft with a memory budget
(``--budget``, what ``edgepeft train --memory-budget`` sets: for a CNN, onnxruntime's shared arena capped at what
the budget leaves, runtime/memory.py; the batch stays whole while it fits), each side on one thread (two cores shared with other jobs make two-thread
timings noise). Every run is its own
process, which reports its peak RSS; time to accuracy counts training steps only (not edgepeft's session
building and memory probes, not torch's model loading and one warm-up pass). Both read the WAV folders
through the device's reader (runtime/audio_data.py), so both see the same features.

    python benchmarks/bench_speech.py [--quick] [--steps 60] [--per-word 8] [--methods ...] [--repeat 5]

Both reach the target within a few evaluations (at step 10 of 60: ~0.15 s of our training), so one run's time ratio
moves by about ±0.1 with the machine and torch's slow first steps. ``--repeat N`` runs each method N times in one
invocation, each repeat from the same start delta and the same batches in the same order, the two sides alternating
(ours first in odd repeats, torch's in even ones), and records every repeat's times, its ratio and the median ratio.
The table is the first repeat's; ``repeats_line`` the per-repeat ratios and their median.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import cnn_children  # noqa: E402
from bench_vision import targets, time_to  # noqa: E402
from common import CACHE, exporter_version, results_version, run_child, write_result  # noqa: E402

from edgepeft.demo import speech_data as S  # noqa: E402

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

EDGEPEFT_CHILD = COMMON + cnn_children.EDGEPEFT

TORCH_CHILD = COMMON + """
import torch
from edgepeft.exporters.audio_specs import load_audio_model
torch.set_num_threads(args["threads"] or __import__("os").cpu_count())  # as the edgepeft child
model, _, _ = load_audio_model("kws-cnn", __import__("pathlib").Path(args["weights"]))  # fp32, its trained head
""" + cnn_children.TORCH


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


def base_model(sets: dict[str, Path], epochs: int) -> tuple[Path, dict]:
    """The KWS CNN trained on the base speakers (workstation, torch), saved with its feature settings; cached."""
    from edgepeft.exporters.kws_train import accuracy, train_kws

    out = CACHE / f"speech-kws-base-{sets['base'].parent.name}-e{epochs}.safetensors"
    info = out.with_suffix(".json")
    if out.is_file() and info.is_file():
        return out, json.loads(info.read_text())
    t0 = time.perf_counter()
    model, spec = train_kws(sets["base"], S.WORDS, epochs, out)
    acc = lambda name: round(accuracy(model, sets[name], S.WORDS, spec), 4)  # noqa: E731
    clips = sum(1 for _ in sets["base"].glob("*/*.wav"))
    meta = {"clips": clips, "epochs": epochs, "train_s": round(time.perf_counter() - t0, 1),
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
    ap.add_argument("--fresh", action="store_true", help="Measure again even where this code and these settings have a "
                    "cached result (a repeat run, e.g. --fresh --out speech_run2).")
    ap.add_argument("--repeat", type=int, default=1, help="Runs of each method in this invocation, from the same start "
                    "and batches, the sides alternating; the results record each and the median ratio (module docstring).")
    a = ap.parse_args(argv)
    if a.repeat < 1:
        ap.error("--repeat: at least 1")
    if a.quick:
        a.steps, a.base_per_word, a.base_epochs, a.per_word, a.test_per_word = 10, 2, 3, 4, 5
    CACHE.mkdir(exist_ok=True)
    t0, load = time.perf_counter(), [round(os.getloadavg()[0], 1)]
    sets = data_sets(a)
    weights, base = base_model(sets, a.base_epochs)
    print(f"base: {base}", file=sys.stderr, flush=True)
    # --repeat 1 is the run as it was before --repeat existed: the same settings, so the same cached results
    settings = {k: v for k, v in vars(a).items() if k not in ("quick", "methods", "out", "fresh") + (("repeat",) if a.repeat == 1 else ())}
    rows = []
    for name, method in METHODS.items():
        done = CACHE / f"speech-{method}-{results_version()}-{_key(settings)}.json"
        if name in a.methods.split(",") and (a.fresh or not done.is_file()):
            b = bundle(method, weights)
            tag = method.replace("+", "_")
            common = {"train_dir": str(sets["new_train"]), "test_dir": str(sets["new_test"]), "steps": a.steps,
                      "batch": a.batch, "lr": a.lr, "every": a.every, "weights": str(weights), "budget": a.budget, "threads": 1,
                      "start": str(CACHE / f"speech-start-{tag}.delta"), "order": str(CACHE / f"speech-order-{tag}.json")}
            runs = repeats(name, b, common, a.repeat)
            from edgepeft.manifest import read_manifest

            ours, theirs = runs[0]
            row = {"method": name, "bundle_method": method, "trainable": read_manifest(b).trainable_numbers,
                   "edgepeft": _side(ours), "torch_peft": _side(theirs)}
            done.write_text(json.dumps({**row, **({"repeats": repeat_summary(runs)} if a.repeat > 1 else {})}))
        if done.is_file():
            rows.append(json.loads(done.read_text()))
    if len(rows) < len(METHODS):
        print(f"{len(rows)} of {len(METHODS)} methods measured with these settings; results written when all are", file=sys.stderr)
        return
    payload = {"model": "KWS CNN (exporters/kws_cnn.py), int8 bundle vs fp32 torch", "words": list(S.WORDS),
               "base_voices": list(S.BASE_VOICES), "new_voice": S.NEW_VOICE, "base": base, "settings": settings,
               "quick": a.quick, "target_accuracy": TARGET_ACCURACY, "rows": rows, "targets": targets(rows),
               "wall_s": round(time.perf_counter() - t0, 1), "load_average_1min": load + [round(os.getloadavg()[0], 1)]}
    path = write_result(a.out + "_quick" if a.quick else a.out, payload)
    print(table(payload))
    if a.repeat > 1:
        print(repeats_line(payload))
    print(f"wrote {path}")


def repeats(name: str, b: Path, common: dict, n: int) -> list[tuple[dict, dict]]:
    """``n`` runs of both children: the first writes the start delta and the batch order, every later one reuses them
    (checked: the edgepeft child writes them again, and they must not change); ours first in odd repeats, torch's in
    even ones, so that a drift in the machine's speed hits both sides alike."""
    import numpy as np

    from edgepeft.delta import load_delta
    from edgepeft.manifest import read_manifest

    manifest = read_manifest(b)

    def digest() -> str:  # the start delta's tensors (its file also records when it was written) and the batch order
        h = hashlib.sha256(Path(common["order"]).read_bytes())
        for k, v in sorted(load_delta(common["start"], manifest, for_training=True).tensors.items()):
            h.update(k.encode() + np.ascontiguousarray(v).tobytes())
        return h.hexdigest()

    runs, first = [], None
    for k in range(n):
        got = {}
        for side in (("edgepeft", "torch") if k % 2 == 0 else ("torch", "edgepeft")):
            got[side] = r = run_child(EDGEPEFT_CHILD if side == "edgepeft" else TORCH_CHILD, str(b), json.dumps(common))
            print(f"{name} (repeat {k + 1}/{n}): {side:8s} {r['before']:.3f} -> {r['test_accuracy']:.3f}, {r['step_s']:.4f} "
                  f"s/step, {r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            if side == "edgepeft" and (first := first or digest()) != digest():
                raise RuntimeError(f"{name}: repeat {k + 1} started from another delta or batch order than the first")
        runs.append((got["edgepeft"], got["torch"]))
    return runs


def repeat_summary(runs: list[tuple[dict, dict]]) -> dict:
    """Each repeat's times (training seconds to the target, step seconds) and ratios, and the median of each ratio."""
    reps = []
    for ours, theirs in runs:
        e, t = _side(ours), _side(theirs)
        tt = None if e["time_to_target_s"] is None or t["time_to_target_s"] is None else \
            round(e["time_to_target_s"] / t["time_to_target_s"], 3)
        reps.append({side: {k: s[k] for k in ("time_to_target_s", "step_s", "cpu_step_s", "train_s", "test_accuracy")}
                     for side, s in (("edgepeft", e), ("torch_peft", t))}
                    | {"time_to_accuracy_ratio": tt, "step_time_ratio": round(e["step_s"] / t["step_s"], 3),
                       "cpu_step_ratio": round(e["cpu_step_s"] / t["cpu_step_s"], 3)})
    med = lambda k: None if any(r[k] is None for r in reps) else round(statistics.median(r[k] for r in reps), 3)  # noqa: E731
    return {"count": len(reps), "runs": reps, "median_time_to_accuracy_ratio": med("time_to_accuracy_ratio"),
            "median_step_time_ratio": med("step_time_ratio"), "median_cpu_step_ratio": med("cpu_step_ratio")}


def repeats_line(payload: dict) -> str:
    """Per method, each repeat's time-to-accuracy ratio and their median, and our step's range against torch's
    (README quotes it; empty for a run without --repeat)."""
    out = []
    for r in payload["rows"]:
        if "repeats" not in r:
            continue
        reps = r["repeats"]
        ours, theirs = ([1000 * x[side]["step_s"] for x in reps["runs"]] for side in ("edgepeft", "torch_peft"))
        ratios = " / ".join("not reached" if x["time_to_accuracy_ratio"] is None else f"{x['time_to_accuracy_ratio']:.2f}×"
                            for x in reps["runs"])
        median = reps["median_time_to_accuracy_ratio"]
        out.append(f"{r['method']}: {ratios} (median {'not reached' if median is None else f'{median:.2f}×'}; our step "
                   f"{min(ours):.1f}-{max(ours):.1f} ms, torch's {min(theirs):.1f}-{max(theirs):.1f} ms)")
    return ";\n".join(out)


def _side(r: dict) -> dict:
    t = time_to(r["curve"], TARGET_ACCURACY)
    return {"before": round(r["before"], 4), "test_accuracy": round(r["test_accuracy"], 4), "step_s": round(r["step_s"], 5),
            "train_s": round(r["train_s"], 3), "cpu_step_s": round(r["cpu_step_s"], 5), "cpu_train_s": round(r["cpu_train_s"], 3),
            "threads": r["threads"], "peak_rss_mb": round(r["peak_rss_mb"], 1),
            **({"memory_plan": r["memory_plan"]} if "memory_plan" in r else {}),
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
           "| s/step (ours / torch) | CPU s/step (ours / torch) | peak RSS MB (ours / torch) |", "|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        e, t, g = r["edgepeft"], r["torch_peft"], payload["targets"][r["method"]]
        tt = "not reached" if g["time_to_accuracy_ratio"] is None else \
            f"{e['time_to_target_s']:.2f} s / {t['time_to_target_s']:.2f} s = {g['time_to_accuracy_ratio']:.2f}×"
        out.append(f"| {r['method']} | {100 * e['before']:.1f} → {100 * e['test_accuracy']:.1f} % / "
                   f"{100 * t['before']:.1f} → {100 * t['test_accuracy']:.1f} % | {g['accuracy_gap_points']:+.1f} | {tt} | "
                   f"{e['step_s']:.4f} / {t['step_s']:.4f} = {g['step_time_ratio']:.2f}× | "
                   f"{e['cpu_step_s']:.4f} / {t['cpu_step_s']:.4f} = {g['cpu_step_ratio']:.2f}× | "
                   f"{e['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} = {g['peak_memory_ratio']:.2f}× |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
