"""Time to accuracy on Rotten Tomatoes: torch + PEFT's usual recipe against edgepeft's defaults, and at one configuration.

Every run trains all-MiniLM-L6-v2 for the same number of optimizer steps (batch 16, AdamW, linear
decay, the same peak learning rate), evaluates the validation split every ``--eval-every`` steps with
the clock stopped, and reports: training seconds until validation accuracy first reaches
``--target``, the process's peak RSS, and test accuracy after the last step. Data: the seeded 80/10/10
split of ``edgepeft.demo.assets.rotten_tomatoes_split(0)`` (majority class: 58.8 % of validation, 57.3 % of test rows).

- **torch + PEFT, usual recipe**: LoRA r=8 (alpha 16, dropout 0.1) on query and value in every layer
  plus the classifier head, shuffled batches padded per batch (``DataCollatorWithPadding``), fp32,
  SDPA attention, train mode (dropout on).
- **edgepeft defaults**: a bundle exported with ``edgepeft export`` defaults (see DEFAULT_BUNDLE) and
  the trainer's batching (length buckets), numpy AdamW, no dropout in the graph.
- **edgepeft at identical configuration**: the recipe of the torch run (fp32 weights, LoRA r=8 on
  query/value in every layer + head, the same shuffled batches in the same order); the difference
  to the torch run is the engine (and dropout, which the graphs do not have).

- **edgepeft defaults with fp32 / int4 weights**: the defaults on another quantization of the same base.

Every configuration runs once per seed (``--seeds``, default 0,1,2: the seed drives LoRA's init, the
head's init and the batch order on both sides; the data split stays seed 0's). Rows report the median
over seeds and the spread (min-max); the time ratio's spread pairs each seed's edgepeft run with the
torch run of the same seed. Beside the first time validation accuracy reaches the target, rows report
when it *holds* there (the first evaluation after which it never falls below the target again).
Each run is its own process; runs alternate order between seeds.

    python benchmarks/bench_time_to_accuracy.py [--steps 200] [--eval-every 25] [--target 0.75] [--seeds 0,1,2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, DEFAULT_BUNDLE, ROOT, median, minilm_bundle, run_child, write_result  # noqa: E402

BATCH, LR, SEED = 16, 2e-3, 0  # SEED: the data split; each run's own seed is cfg["seed"]
EVAL_BATCH = 16  # the trainer evaluates at its batch size; HF's Trainer default is 8
IDENTICAL_BUNDLE = {"quantize": "none", "method": "lora", "top_layers": None}


def data_files() -> dict[str, Path]:
    """The split as JSONL under benchmarks/.cache/rotten_tomatoes (written once)."""
    from edgepeft.demo.assets import rotten_tomatoes_split, write_jsonl

    out = CACHE / "rotten_tomatoes"
    paths = {k: out / f"{k}.jsonl" for k in ("train", "val", "test")}
    if not all(p.is_file() for p in paths.values()):
        for k, rows in rotten_tomatoes_split(SEED).items():
            write_jsonl(paths[k], rows)
    return paths


def shuffled_batches(n: int, steps: int, seed: int) -> list[list[int]]:
    """What a shuffling DataLoader does: a fresh permutation each epoch, cut into batches (last one kept)."""
    import numpy as np

    rng, out = np.random.default_rng(seed), []
    while len(out) < steps:
        order = rng.permutation(n)
        out += [order[i:i + BATCH].tolist() for i in range(0, n, BATCH)]
    return out[:steps]


def _read(path: str) -> tuple[list[str], list[int]]:
    rows = [json.loads(l) for l in open(path)]
    return [r["text"] for r in rows], [("rotten", "fresh").index(r["label"]) for r in rows]


def _loop(step_fn, eval_fn, batches, cfg: dict) -> dict:
    """Train over ``batches``; evaluate with the clock stopped; return the curve and what it reached."""
    from edgepeft.runtime.memory import peak_rss_mb, rss_mb

    curve, train_s, reached = [], 0.0, None
    load_rss = rss_mb()
    for step, batch in enumerate(batches, 1):
        t0 = time.perf_counter()
        step_fn(batch, step - 1)
        train_s += time.perf_counter() - t0
        if step % cfg["eval_every"] == 0 or step == len(batches):
            acc = eval_fn("val")
            curve.append({"step": step, "train_s": round(train_s, 2), "val_accuracy": round(acc, 4)})
            print(f"  step {step}: val {acc:.3f} after {train_s:.1f} s", file=sys.stderr, flush=True)
            if reached is None and acc >= cfg["target"]:
                reached = {"step": step, "train_s": round(train_s, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}
    held = next((c for i, c in enumerate(curve) if all(d["val_accuracy"] >= cfg["target"] for d in curve[i:])), None)
    return {"curve": curve, "reached": reached, "held": held and {"step": held["step"], "train_s": held["train_s"]},
            "train_s": round(train_s, 2), "test_accuracy": round(eval_fn("test"), 4),
            "rss_after_load_mb": round(load_rss, 1), "tokens": cfg.get("tokens", 0)}


def torch_child(cfg: dict) -> dict:
    """torch + PEFT: the usual Trainer-free loop (what HF's Trainer does per step, without its overhead)."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from edgepeft.demo.assets import minilm_dir

    transformers.logging.set_verbosity_error()
    torch.manual_seed(cfg["seed"])
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=cfg["dropout"], task_type="SEQ_CLS",
                                             target_modules=["query", "value"]))
    collate = transformers.DataCollatorWithPadding(tok)
    data = {k: _read(cfg["data"][k]) for k in ("train", "val", "test")}
    data = {k: (t[:cfg["eval_rows"]], y[:cfg["eval_rows"]]) if k != "train" and cfg.get("eval_rows") else (t, y)
            for k, (t, y) in data.items()}
    enc = {k: tok(t, truncation=True, max_length=128)["input_ids"] for k, (t, _) in data.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / cfg["steps"]))
    batches = cfg["batches"]
    cfg["tokens"] = sum(max(len(enc["train"][i]) for i in b) * len(b) for b in batches)

    def step_fn(batch, _):
        model.train()
        feats = collate([{"input_ids": enc["train"][i]} for i in batch])
        y = torch.tensor([data["train"][1][i] for i in batch])
        loss = torch.nn.functional.cross_entropy(model(**feats).logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()

    def eval_fn(split):
        model.eval()
        ids, ys = enc[split], data[split][1]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        correct = 0
        with torch.inference_mode():
            for s in range(0, len(order), EVAL_BATCH):
                idx = order[s:s + EVAL_BATCH]
                pred = model(**collate([{"input_ids": ids[i]} for i in idx])).logits.argmax(-1)
                correct += sum(int(p) == ys[i] for p, i in zip(pred, idx))
        return correct / len(ids)

    return _loop(step_fn, eval_fn, batches, cfg)


def edgepeft_child(cfg: dict) -> dict:
    """edgepeft: train.onnx for loss and gradients, numpy AdamW, the inference graph for evaluation."""
    import numpy as np

    from edgepeft.delta import delta_from_init
    from edgepeft.names import grad_name
    from edgepeft.runtime.bundle import SessionConfig, open_bundle
    from edgepeft.runtime.data import load_dataset, plan_batches
    from edgepeft.runtime.evaluate import evaluate
    from edgepeft.runtime.infer import Predictor
    from edgepeft.runtime.optim import AdamW, clip_by_global_norm, lr_at
    from edgepeft.runtime.text import load_tokenizer

    b = open_bundle(cfg["bundle"])
    session = b.session("train", SessionConfig(**cfg.get("session", {})))
    predictor = Predictor(b)
    tok = load_tokenizer(b)
    data = {k: load_dataset(cfg["data"][k], b.manifest, tok) for k in ("train", "val", "test")}
    if cfg.get("eval_rows"):
        for k in ("val", "test"):
            d, n = data[k], cfg["eval_rows"]
            data[k] = type(d)(d.path, d.task, d.ids[:n], d.labels[:n], d.lines[:n], d.sha256, d.pad_id)
    delta = delta_from_init(b.manifest, cfg["seed"])
    params = delta.tensors
    opt = AdamW(params, weight_decay=0.01)
    names = [s.name for s in b.manifest.slots]
    outputs = ["loss"] + [grad_name(n) for n in names]
    batches = cfg["batches"]
    if batches is None:  # the trainer's own batching: length buckets, epoch after epoch
        rng, batches = np.random.default_rng(cfg["seed"]), []
        while len(batches) < cfg["steps"]:
            batches += plan_batches(data["train"].lengths, BATCH, rng, **cfg.get("bucketing", {}))
        batches = batches[:cfg["steps"]]
    lengths = data["train"].lengths
    cfg["tokens"] = int(sum(lengths[np.asarray(i)].max() * len(i) for i in batches))

    def step_fn(batch, step):
        out = session.run(outputs, {**data["train"].batch(np.asarray(batch)), **params})
        grads = dict(zip(names, out[1:]))
        clip_by_global_norm(grads, 1.0)
        opt.step(grads, lr_at(step, base_lr=cfg["lr"], total=cfg["steps"], warmup=0, schedule="linear"))

    def eval_fn(split):
        return evaluate(predictor, data[split], [delta], batch_size=EVAL_BATCH)["accuracy"]

    return _loop(step_fn, eval_fn, batches, cfg)


def configs(steps: int, eval_every: int, target: float, eval_rows: int = 0, seed: int = 0) -> dict[str, tuple[str, dict]]:
    """Every run this benchmark knows, at one seed; the default selection is DEFAULT_RUNS, the others are levers."""
    data = {k: str(v) for k, v in data_files().items()}
    n_train = sum(1 for _ in open(data["train"]))
    order = shuffled_batches(n_train, steps, seed)
    common = {"data": data, "steps": steps, "eval_every": eval_every, "target": target, "lr": LR, "eval_rows": eval_rows,
              "seed": seed}
    ours = lambda **spec: {**common, "batches": None, "bundle": {**DEFAULT_BUNDLE, **spec}}  # noqa: E731
    return {
        "torch+peft usual recipe": ("torch_child", {**common, "batches": order, "dropout": 0.1}),
        "edgepeft defaults": ("edgepeft_child", ours()),
        "edgepeft defaults with fp32 weights": ("edgepeft_child", ours(quantize="none")),
        "edgepeft defaults with int4 weights": ("edgepeft_child", ours(quantize="int4")),
        "edgepeft at identical configuration": ("edgepeft_child", {**common, "batches": order,
                                                                 "bundle": IDENTICAL_BUNDLE}),
        # levers, run with --runs
        "edgepeft defaults but every layer": ("edgepeft_child", ours(top_layers=None)),
        "edgepeft defaults but top 2 layers": ("edgepeft_child", ours(top_layers=2)),
        "edgepeft defaults but top 3 layers": ("edgepeft_child", ours(top_layers=3)),
        "edgepeft defaults but shuffled batches": ("edgepeft_child", {**ours(), "batches": order}),
        "torch+peft usual recipe without dropout": ("torch_child", {**common, "batches": order, "dropout": 0.0}),
    }


DEFAULT_RUNS = ["torch+peft usual recipe", "edgepeft defaults", "edgepeft defaults with fp32 weights",
                "edgepeft defaults with int4 weights", "edgepeft at identical configuration"]
REFERENCE = "torch+peft usual recipe"


def run_configs(per_seed: list[dict[str, tuple[str, dict]]]) -> dict[str, list[dict]]:
    """Each configuration of each seed in its own process, order alternating between seeds."""
    runs: dict[str, list[dict]] = {k: [] for k in per_seed[0]}
    for r, cfgs in enumerate(per_seed):
        for name in (list(cfgs) if r % 2 == 0 else list(reversed(cfgs))):
            fn, cfg = cfgs[name]
            if isinstance(cfg.get("bundle"), dict):  # exported (once) only when the run is picked
                cfg = {**cfg, "bundle": str(minilm_bundle(**cfg["bundle"]))}
            code = f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); import bench_time_to_accuracy as b; " \
                   f"print('RESULT', json.dumps(b.{fn}(json.loads(sys.argv[1]))))"
            print(f"{name}, seed {cfg['seed']} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            res = run_child(code, json.dumps(cfg), stream_stderr=True)
            res["wall_s"], res["seed"] = round(time.perf_counter() - t0, 1), cfg["seed"]
            runs[name].append(res)
    return runs


def _spread(xs: list[float], digits: int = 1) -> list[float]:
    return [round(min(xs), digits), round(max(xs), digits)]


def summarize(runs: dict[str, list[dict]], ref: str) -> list[dict]:
    """One row per configuration: medians over seeds, with the min-max spread where a run can differ."""
    rows = []
    for name, rs in runs.items():
        every = lambda key: [r[key] for r in rs] if all(r[key] for r in rs) else None  # noqa: E731
        hit, held = every("reached"), every("held")
        rows.append({"config": name, "seeds": [r["seed"] for r in rs],
                     "seconds_to_target": round(median([h["train_s"] for h in hit]), 1) if hit else None,
                     "seconds_to_target_spread": _spread([h["train_s"] for h in hit]) if hit else None,
                     "steps_to_target": int(median([h["step"] for h in hit])) if hit else None,
                     "seconds_to_hold": round(median([h["train_s"] for h in held]), 1) if held else None,
                     "peak_rss_mb": round(median([r["peak_rss_mb"] for r in rs]), 1),
                     "train_s_all_steps": round(median([r["train_s"] for r in rs]), 1),
                     "padded_tokens": int(median([r["tokens"] for r in rs])),
                     "test_accuracy": round(median([r["test_accuracy"] for r in rs]), 4),
                     "test_accuracy_spread": _spread([r["test_accuracy"] for r in rs], 4),
                     "best_val_accuracy": round(median([max(c["val_accuracy"] for c in r["curve"]) for r in rs]), 4)})
    base = next(r for r in rows if r["config"] == ref)
    base_runs = {r["seed"]: r for r in runs[ref]}
    for r in rows:
        ok = r["seconds_to_target"] is not None and base["seconds_to_target"]
        r["time_ratio_vs_torch"] = round(r["seconds_to_target"] / base["seconds_to_target"], 3) if ok else None
        paired = [o["reached"]["train_s"] / base_runs[o["seed"]]["reached"]["train_s"] for o in runs[r["config"]]
                  if o["reached"] and base_runs.get(o["seed"], {}).get("reached")]
        r["time_ratio_spread"] = _spread(paired, 3) if ok and len(paired) == len(r["seeds"]) else None
        r["peak_ratio_vs_torch"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
        r["test_accuracy_delta_vs_torch"] = round(100 * (r["test_accuracy"] - base["test_accuracy"]), 2)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of every run (batch 16)")
    ap.add_argument("--eval-every", type=int, default=25, help="validation every N steps (clock stopped)")
    ap.add_argument("--target", type=float, default=0.75, help="validation accuracy to reach")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every configuration runs once per seed")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated runs (see configs())")
    ap.add_argument("--out", default="time_to_accuracy", help="results/<out>.json")
    ap.add_argument("--eval-rows", type=int, default=0, help="evaluate on the first N validation/test rows (0: all)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, 200 evaluation rows, a low target, seed 0 only")
    args = ap.parse_args(argv)
    eval_rows = args.eval_rows
    if args.quick:
        args.steps, args.eval_every, args.target, eval_rows, args.seeds = 20, 10, 0.6, 200, "0"
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    known = [configs(args.steps, args.eval_every, args.target, eval_rows, seed) for seed in seeds]
    picked = [n.strip() for n in args.runs.split(",") if n.strip()]
    if bad := [n for n in picked if n not in known[0]]:
        ap.error(f"unknown run(s) {bad}; known: {list(known[0])}")
    runs = run_configs([{n: k[n] for n in picked} for k in known])
    rows = summarize(runs, REFERENCE if REFERENCE in runs else picked[0])
    write_result(args.out, {
        "benchmark": f"time to {args.target:.0%} validation accuracy, Rotten Tomatoes, all-MiniLM-L6-v2",
        "steps": args.steps, "eval_every": args.eval_every, "target": args.target, "batch": BATCH, "lr": LR,
        "eval_rows": eval_rows or "all", "seeds": seeds,
        "default_bundle": DEFAULT_BUNDLE, "rows": rows, "raw": runs})
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
