"""Rotten Tomatoes with all-MiniLM-L6-v2: `edgepeft train` on the int8 bundle against torch + PEFT fp32, one job.

Both sides train the same slots (LoRA r=8, alpha 16 on query and value in every layer, BitFit biases,
the 2-class head) from the same start (edgepeft's seeded LoRA A, the bundle's head) with the same
AdamW, linear schedule, clipping, batch size and epochs, on the same padded batches in the SAME
order: the parent writes edgepeft's batch order to a file, the edgepeft child checks it trained in
exactly that order and the torch child replays it. Both keep the delta with the best validation
accuracy at epoch ends, then report test accuracy, wall time and peak memory, each in its own process.
torch runs in eval mode (no dropout) because edgepeft's graphs have none.

    python benchmarks/bench_train_rotten_tomatoes.py [--quick] [--epochs 1] [--train-rows 0] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, minilm_bundle, run_child, write_result  # noqa: E402



def majority_share(path: Path) -> float:
    """Accuracy of always answering the most frequent label of the JSONL rows at ``path`` (the floor a run must beat)."""
    from collections import Counter

    labels = Counter(json.loads(line)["label"] for line in open(path) if line.strip())
    return round(max(labels.values()) / sum(labels.values()), 4)

EDGEPEFT_CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
from edgepeft.runtime import data as D
bundle, train, val, test, out, order_file, cli_args = sys.argv[1], *sys.argv[2:7], json.loads(sys.argv[7])
used, plain_batch = [], D.Dataset.batch
def recording_batch(self, index, max_length=None):  # records the training batches edgepeft really uses
    if self.path == Path(train):
        used.append([int(i) for i in index])
    return plain_batch(self, index, max_length)
D.Dataset.batch = recording_batch
from edgepeft.cli import main
import contextlib, io, re
said = io.StringIO()
t0 = time.perf_counter()
with contextlib.redirect_stdout(said):
    main(["train", bundle, "--data", train, "--val", val, "-o", out, *cli_args])
train_s = time.perf_counter() - t0
summary = said.getvalue()
loop_s = float(re.search(r"steps \\(.*\\) in ([\\d.]+) s", summary).group(1))  # the CLI's own step-loop time
print(summary, file=sys.stderr)
D.Dataset.batch = plain_batch
if used != [b for epoch in json.load(open(order_file)) for b in epoch]:
    sys.exit("edgepeft trained in another batch order than the shared order file")
from edgepeft.delta import load_delta
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.evaluate import evaluate
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.text import load_tokenizer
b = open_bundle(bundle)
delta = load_delta(out, b.manifest)
m = evaluate(Predictor(b), D.load_dataset(test, b.manifest, load_tokenizer(b)), [delta])
print("RESULT", json.dumps({"test_accuracy": m["accuracy"], "test_loss": m["loss"], "train_s": train_s,
                            "steps": len(used), "val_accuracy": float(delta.meta.extra["val_accuracy"]),
                            "loop_s": loop_s, "summary": summary.strip().splitlines()}))
"""

TORCH_CHILD = """
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import numpy as np, torch, transformers
from peft import LoraConfig, get_peft_model
from edgepeft.delta import delta_from_init
from edgepeft.demo.assets import minilm_dir
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.data import eval_batches, load_dataset
from edgepeft.runtime.text import load_tokenizer
from edgepeft.runtime.weights import read_frozen
bundle, train, val, test, order_file, hp = sys.argv[1], *sys.argv[2:6], json.loads(sys.argv[6])
transformers.logging.set_verbosity_error()
if hp["threads"]:
    torch.set_num_threads(hp["threads"])
b = open_bundle(bundle)
tok = load_tokenizer(b)
data = {k: load_dataset(p, b.manifest, tok) for k, p in (("train", train), ("val", val), ("test", test))}
order = json.load(open(order_file))
t0 = time.perf_counter()  # wall time from loading the model, as edgepeft's from opening the bundle
model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, attn_implementation="eager")
frozen = read_frozen(b)
with torch.no_grad():  # the same starting head as the bundle's (edgepeft trains a delta on top of it)
    model.classifier.weight.copy_(torch.from_numpy(frozen["classifier.weight"]))
    model.classifier.bias.copy_(torch.from_numpy(frozen["classifier.bias"]))
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="SEQ_CLS", target_modules=["query", "value"]))
slots = {s.name: s for s in b.manifest.slots}
start = delta_from_init(b.manifest, hp["seed"]).tensors
def canonical(n):  # PEFT's parameter name -> the bundle's slot name
    n = n.removeprefix("base_model.model.").replace(".base_layer", "").replace(".modules_to_save.default", "")
    return n.replace(".default.weight", "")  # query.lora_A.default.weight -> query.lora_A
trained = 0
for n, p in model.named_parameters():
    c = canonical(n)
    if "original_module" in n or c not in slots:
        p.requires_grad_(False)
        continue
    p.requires_grad_(True)
    trained += p.numel()
    if slots[c].kind == "lora_A":
        with torch.no_grad():
            p.copy_(torch.from_numpy(start[c]))  # the same LoRA A init as edgepeft's fresh delta
if trained != sum(int(np.prod(s.shape)) for s in slots.values()):
    sys.exit(f"torch trains {trained} numbers, the bundle's slots hold another count")
model.eval()  # no dropout, as in edgepeft's graphs
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"], betas=(0.9, 0.999), eps=1e-8)
total = sum(len(e) for e in order)
warmup = int(round(hp["warmup"] * total)) if hp["warmup"] < 1 else int(hp["warmup"])
sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
def tensors(ds, idx):
    return {k: torch.from_numpy(v) for k, v in ds.batch(idx).items()}
def accuracy(ds):
    right = 0
    with torch.no_grad():
        for idx in eval_batches(ds.lengths, 32):
            t = tensors(ds, idx)
            right += int((model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits.argmax(-1) == t["labels"]).sum())
    return right / len(ds)
best, best_state = -1.0, None
t_loop = time.perf_counter()
for epoch in order:
    for idx in epoch:
        t = tensors(data["train"], idx)
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits, t["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad()
    acc = accuracy(data["val"])
    if acc > best:  # strictly better, as edgepeft keeps its best delta
        best, best_state = acc, [p.detach().clone() for p in params]
train_s, loop_s = time.perf_counter() - t0, time.perf_counter() - t_loop
with torch.no_grad():
    for p, s in zip(params, best_state):
        p.copy_(s)
print("RESULT", json.dumps({"test_accuracy": accuracy(data["test"]), "train_s": train_s, "loop_s": loop_s, "steps": total,
                            "val_accuracy": best}))
"""


def data_files(train_rows: int, seed: int) -> dict[str, Path]:
    """The seeded 80/10/10 Rotten Tomatoes split as JSONL (train cut to ``train_rows`` if > 0)."""
    from edgepeft.demo.assets import rotten_tomatoes_split, write_jsonl

    split = rotten_tomatoes_split(seed)
    if train_rows:
        split["train"] = split["train"][:train_rows]
    root = CACHE / f"rt-s{seed}-n{len(split['train'])}"
    return {k: write_jsonl(root / f"{k}.jsonl", rows) for k, rows in split.items()}


def write_order(bundle: Path, train: Path, *, batch_size: int, epochs: int, seed: int, out: Path) -> int:
    """Write edgepeft's batch order (one list of index lists per epoch) to ``out``; return the step count."""
    import numpy as np

    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.data import load_dataset, plan_batches
    from edgepeft.runtime.text import load_tokenizer

    b = open_bundle(bundle)
    lengths = load_dataset(train, b.manifest, load_tokenizer(b)).lengths
    rng = np.random.default_rng(seed)  # the trainer's generator: one plan_batches call per epoch, in sequence
    order = [[[int(i) for i in idx] for idx in plan_batches(lengths, batch_size, rng)] for _ in range(epochs)]
    out.write_text(json.dumps(order))
    return sum(len(e) for e in order)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,200 training rows, 1 epoch (a smoke run, ~3 min)")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the training rows")
    ap.add_argument("--train-rows", type=int, default=0, help="use the first N rows of the training split (0: all 10,246)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=float, default=0.06, help="fraction of steps (or a step count if >= 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split, the data order and the LoRA A init")
    ap.add_argument("--threads", type=int, default=0, help="compute threads on both sides (0: each library's default, all cores)")
    args = ap.parse_args()
    if args.quick:
        args.train_rows, args.epochs = args.train_rows or 1200, 1
    hp = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": 0.01,
          "warmup": args.warmup, "max_grad_norm": 1.0, "seed": args.seed, "schedule": "linear", "threads": args.threads}
    bundle = minilm_bundle("int8")
    files = data_files(args.train_rows, args.seed)
    order = files["train"].parent / f"order-b{args.batch_size}-e{args.epochs}.json"
    steps = write_order(bundle, files["train"], batch_size=args.batch_size, epochs=args.epochs, seed=args.seed, out=order)
    paths = [str(bundle), str(files["train"]), str(files["val"]), str(files["test"])]
    cli = ["--epochs", args.epochs, "--batch-size", args.batch_size, "--lr", args.lr, "--weight-decay", hp["weight_decay"],
           "--warmup", args.warmup, "--max-grad-norm", hp["max_grad_norm"], "--seed", args.seed, "--schedule", "linear", "--threads", args.threads, "-q"]
    print(f"{steps} steps per side ({args.epochs} epoch(s) of {sum(1 for _ in open(files['train']))} rows, batch "
          f"{args.batch_size}); edgepeft int8 first, then torch + PEFT fp32", file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    ours = run_child(EDGEPEFT_CHILD, *paths, str(order.parent / "edgepeft.delta"), str(order), json.dumps([str(x) for x in cli]))
    print(f"edgepeft: test accuracy {ours['test_accuracy']:.4f} in {ours['train_s']:.0f} s", file=sys.stderr, flush=True)
    ref = run_child(TORCH_CHILD, *paths, str(order), json.dumps(hp))
    rows = {"edgepeft int8 (onnxruntime)": ours, "torch + PEFT fp32": ref}
    gap = 100 * (ref["test_accuracy"] - ours["test_accuracy"])
    result = {
        "benchmark": "Rotten Tomatoes, all-MiniLM-L6-v2, LoRA r=8 q+v + BitFit + head: edgepeft int8 vs torch+PEFT fp32",
        "hyper_parameters": hp, **{f"{k}_rows": sum(1 for _ in open(p)) for k, p in files.items()},
        "setup": "same slots, same start (edgepeft's seeded LoRA A, the bundle's head), same AdamW/linear schedule/clipping, "
                 "same padded batches in the same order (edgepeft checked it trained in the shared order); torch in eval mode "
                 "(no dropout, like edgepeft's graphs); both keep the delta with the best validation accuracy at epoch ends; "
                 "wall time from loading the model/bundle, step loop = steps + end-of-epoch validation",
        "steps": steps, "quick": args.quick, "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)], "majority_class_accuracy": majority_share(files["test"]),
        "accuracy_gap_points": round(gap, 2), "within_1_5_points": abs(gap) <= 1.5,
        "rows": [{"side": k, "test_accuracy": round(v["test_accuracy"], 4), "best_val_accuracy": round(v["val_accuracy"], 4),
                  "train_wall_s": round(v["train_s"], 1), "loop_s": round(v["loop_s"], 1),
                  "steps_per_s": round(v["steps"] / v["loop_s"], 2),
                  "peak_rss_mb": round(v["peak_rss_mb"], 1)} for k, v in rows.items()],
    }
    write_result("train_rotten_tomatoes" + ("_quick" if args.quick else ""), result)
    print("| side | test accuracy | best val accuracy | train wall s | step loop s | steps/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['side']} | {100 * r['test_accuracy']:.2f} % | {100 * r['best_val_accuracy']:.2f} % | {r['train_wall_s']} | "
              f"{r['loop_s']} | {r['steps_per_s']} | {r['peak_rss_mb']} |")
    print(f"accuracy gap (torch - edgepeft): {gap:+.2f} points; majority class {100 * result['majority_class_accuracy']:.1f} %")


if __name__ == "__main__":
    main()
