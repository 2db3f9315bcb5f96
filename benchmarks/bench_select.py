"""`edgepeft train --select auto` beside fixed `--top-layers` exports, under one memory and one delta byte budget.

all-MiniLM-L6-v2 int8, LoRA r=8 on query and value + the 2-class head, Rotten Tomatoes (the rows and schedule of
bench_methods.py). Fixed rows: bundles exported with ``--top-layers k``. Selected rows: the every-layer bundle trained
with ``--select auto --max-delta-bytes B``, B the float32 bytes of the top-k bundle's slots, so both send the same
delta. Every run trains under ``--memory-budget`` (default 200 MB) in its own process; reported: test accuracy, the
modules and layers trained, the delta's float32 and packed bytes, seconds per step and peak RSS.

    python benchmarks/bench_select.py [--top 1,2] [--memory-budget 200] [--steps 200] [--train-rows 1200] [--test-rows 500]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_methods import test_file  # noqa: E402
from bench_train_rotten_tomatoes import data_files, majority_share  # noqa: E402
from common import minilm_bundle, run_child, write_result  # noqa: E402

CHILD = """
import json, sys
import numpy as np
from edgepeft.delta import pack
from edgepeft.runtime import data as D
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.evaluate import evaluate
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.text import load_tokenizer
from edgepeft.runtime.select import layer_of
from edgepeft.runtime.trainer import TrainConfig, Trainer
bundle, train, test, hp = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
b = open_bundle(bundle)
tok = load_tokenizer(b)
cfg = TrainConfig(epochs=1000, max_steps=hp["steps"], batch_size=hp["batch_size"], lr=hp["lr"], seed=hp["seed"],
                  memory_budget_mb=hp["memory_budget_mb"], select=hp["select"], max_delta_bytes=hp["max_delta_bytes"])
res = Trainer(b, D.load_dataset(train, b.manifest, tok), cfg).fit()
delta, s = res.delta, res.summary
m = evaluate(Predictor(b), D.load_dataset(test, b.manifest, tok), [delta])
trained = [k for k, v in delta.tensors.items() if np.any(v)]
print("RESULT", json.dumps({"test_accuracy": m["accuracy"], "step_s": s.seconds / s.steps, "packed_bytes": len(pack(delta)),
                            "float32_bytes": 4 * sum(delta.tensors[k].size for k in trained), "selection": s.selection,
                            "layers": sorted({layer_of(k) for k in trained if layer_of(k) is not None}),
                            "memory_plan": s.memory.describe()}))
"""


def slot_bytes(bundle: Path) -> int:
    """float32 bytes of every slot of a bundle (what --max-delta-bytes counts)."""
    from edgepeft.runtime.bundle import open_bundle

    return sum(4 * math.prod(s.shape) for s in open_bundle(bundle).manifest.slots)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", default="1,2", help="fixed --top-layers values to compare with")
    ap.add_argument("--memory-budget", type=float, default=200.0, help="--memory-budget of every run, MB")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of every run (bench_methods.py's)")
    ap.add_argument("--train-rows", type=int, default=1200)
    ap.add_argument("--test-rows", type=int, default=500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    files = data_files(args.train_rows, args.seed)
    test = test_file(files["test"], args.test_rows)
    hp = {"steps": args.steps, "batch_size": 16, "lr": args.lr, "seed": args.seed, "memory_budget_mb": args.memory_budget}
    load_before = os.getloadavg()
    every = minilm_bundle("int8", "lora+head", top_layers=None)
    rows: list[dict] = []

    def save() -> None:  # after every run: a run cut short keeps the rows it finished
        write_result("select", {
            "benchmark": "Rotten Tomatoes, all-MiniLM-L6-v2 int8, LoRA r=8 q/v + head: --select auto vs fixed --top-layers",
            "settings": {**hp, "train_rows": args.train_rows, "test_rows": args.test_rows},
            "majority_class_accuracy": majority_share(test),
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)], "rows": rows})

    for k in (int(t) for t in args.top.split(",")):
        fixed = minilm_bundle("int8", "lora+head", top_layers=k)
        budget = slot_bytes(fixed)
        for name, bundle, select in ((f"--top-layers {k}", fixed, "all"), (f"--select auto, {budget} B", every, "auto")):
            res = run_child(CHILD, str(bundle), str(files["train"]), str(test),
                            json.dumps({**hp, "select": select, "max_delta_bytes": budget if select == "auto" else 0}))
            rows.append({"run": name, "top_layers": k, "max_delta_bytes": budget, **res})
            save()
            print(f"{name}: {res['test_accuracy']:.4f}, layers {res['layers']}, peak {res['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    print(table(rows))


def table(rows: list[dict]) -> str:
    """The markdown table printed and copied into the README."""
    out = ["| run (same delta bytes) | layers trained | test acc. | packed delta B | s/step | peak RSS MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['run']} | {', '.join(map(str, r['layers']))} | {100 * r['test_accuracy']:.2f} % | "
                   f"{r['packed_bytes']:,} | {r['step_s']:.3f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
