"""Each lever of the push, measured on its own: one edgepeft train step at a Rotten-Tomatoes-like shape.

Shape: batch 16, length 48 (about the longest of 16 shuffled Rotten Tomatoes snippets). Against the
default (int8 bundle, LoRA q/v in every layer + head, session defaults), one thing changes per row:

- **top-k layers**: bundles exported with ``--top-layers k``; the backward pass stops below layer 6-k.
- **weights**: fp32 instead of int8 (int4: train_step.json; int8's accuracy cost: time_to_accuracy.json).
- **session options**: graph optimization level basic / extended, the CPU memory arena off,
  1 intra-op thread instead of all cores.
- **length bucketing** (no step to run: counted): padded tokens per epoch of Rotten Tomatoes train
  with shuffled batches padded per batch (the PEFT recipe) against the trainer's length buckets;
  the step time scales with those tokens.

Each configuration is its own process; rounds alternate the order.

    python benchmarks/bench_levers.py [--rounds 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import edgepeft_config, rows_from  # noqa: E402
from common import alternate, minilm_bundle, write_result  # noqa: E402

BATCH, LENGTH = 16, 48
BASE = {"quantize": "int8", "method": "lora"}


def bucketing() -> list[dict]:
    """Padded tokens of one epoch of Rotten Tomatoes train: shuffled batches vs the trainer's length buckets."""
    import numpy as np
    from tokenizers import Tokenizer

    from bench_time_to_accuracy import BATCH as B, _read, data_files
    from edgepeft.demo.assets import minilm_dir
    from edgepeft.runtime.data import plan_batches

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=128)
    lengths = np.array([len(e.ids) for e in tok.encode_batch(_read(str(data_files()["train"]))[0])])
    real = int(lengths.sum())
    out = []
    for name, bucket in (("shuffled, padded per batch (PEFT recipe)", 1), ("length buckets of 10 batches", 10),
                         ("length buckets of 50 batches (trainer default)", 50)):
        padded = [int(sum(lengths[b].max() * len(b) for b in plan_batches(lengths, B, np.random.default_rng(s), bucket)))
                  for s in range(3)]
        tokens = float(np.median(padded))
        out.append({"config": name, "padded_tokens_per_epoch": int(tokens), "real_tokens": real,
                    "padding_share": round(1 - real / tokens, 3)})
    for r in out:
        r["tokens_ratio_vs_shuffled"] = round(r["padded_tokens_per_epoch"] / out[0]["padded_tokens_per_epoch"], 3)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per configuration")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per process (after 2 warm-up steps)")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 step, fewer configurations")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 1
    s, ref = args.steps, "default (int8, every layer, session defaults)"
    configs = {ref: (edgepeft_config(minilm_bundle(**BASE), s, BATCH, LENGTH), 6)}
    for k in ((2,) if args.quick else (3, 2, 1)):
        configs[f"top {k} layers"] = (edgepeft_config(minilm_bundle(**BASE, top_layers=k), s, BATCH, LENGTH), k)
    if not args.quick:
        configs["fp32 weights"] = (edgepeft_config(minilm_bundle("none", "lora"), s, BATCH, LENGTH), 6)
        configs["graph optimization basic"] = (edgepeft_config(minilm_bundle(**BASE), s, BATCH, LENGTH, optimization="basic"), 6)
        configs["graph optimization extended"] = (edgepeft_config(minilm_bundle(**BASE), s, BATCH, LENGTH, optimization="extended"), 6)
    configs["memory arena off"] = (edgepeft_config(minilm_bundle(**BASE), s, BATCH, LENGTH, arena=False), 6)
    configs["1 intra-op thread"] = (edgepeft_config(minilm_bundle(**BASE), s, BATCH, LENGTH, threads=1), 6)
    runs = alternate({n: c for n, (c, _) in configs.items()}, args.rounds,
                     lambda n, r: f"{r['step_s'] * 1000:.0f} ms, peak {r['peak_rss_mb']:.0f} MB")
    rows = rows_from(runs, {n: k for n, (_, k) in configs.items()}, ref, BATCH, LENGTH)
    buckets = bucketing()
    write_result("levers", {"benchmark": f"levers, one edgepeft train step, batch {BATCH}, length {LENGTH}",
                            "reference": ref, "rounds": args.rounds, "steps": args.steps, "rows": rows,
                            "bucketing": buckets, "raw": runs})
    for r in rows:
        print(f"{r['config']:<48} {r['step_ms']:>8} ms ({r['step_ratio']}×)  peak {r['peak_rss_mb']} MB ({r['peak_ratio']}×)")
    for r in buckets:
        print(f"{r['config']:<48} {r['padded_tokens_per_epoch']:>8} padded tokens/epoch ({r['tokens_ratio_vs_shuffled']}×), "
              f"{r['padding_share']:.0%} padding")


if __name__ == "__main__":
    main()
