"""P-tuning recipes screened: edgepeft int8 and torch + PEFT fp32, step by step, from the same start and batches.

For bench_methods' P-tuning bundle (or one of another encoder width) and batches: the per-tensor agreement of
the first step's gradients (cosine, share of equal signs: Adam's first steps move every number by about lr
times the sign of its gradient), then each side's training loss per step for each run of ``--runs``
(lr:steps:warmup; both sides train the same batches from the same start with bench_methods' AdamW and
clipping, linear warmup then decay over the run's steps). The torch side is bench_methods'
(benchmarks/peft_start.py). Writes results/methods_ptuning_lr.json (``--out``).

    python benchmarks/ptuning_probe.py [--runs 1e-2:30:0,1e-2:30:20] [--seed 0] [--encoder-hidden-size 128] [--out NAME]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_methods import OPTIONS  # noqa: E402
from bench_train_rotten_tomatoes import data_files  # noqa: E402
from common import minilm_bundle, write_result  # noqa: E402
from edgepeft.names import PROMPT_MODULE, PT_W0, slot_name  # noqa: E402
from peft_start import peft_model, torch_param  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="1e-2:30:0,1e-2:30:20", help="lr:steps:warmup triples, one run of each side per triple")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    import transformers

    from edgepeft.runtime import data as D
    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.held_slots import HeldSlots
    from edgepeft.runtime.text import load_tokenizer
    from edgepeft.runtime.trainer import TrainConfig, Trainer

    options = {**OPTIONS.get("ptuning+head", {}), **({"encoder_hidden_size": args.encoder_hidden_size} if args.encoder_hidden_size else {})}
    b = open_bundle(minilm_bundle("int8", "ptuning+head", top_layers=None, rank=None, method_config=options or None))
    ds = D.load_dataset(data_files(1200, args.seed)["train"], b.manifest, load_tokenizer(b))
    runs = []
    for triple in args.runs.split(","):
        lr, steps, warmup = float(triple.split(":")[0]), int(triple.split(":")[1]), int(triple.split(":")[2])
        used, plain = [], D.Dataset.batch

        def recording(self, index, max_length=None):  # the batches edgepeft trains on, replayed by torch
            used.append(np.asarray(index))
            return plain(self, index, max_length)

        ours: list[float] = []
        D.Dataset.batch = recording
        cfg = TrainConfig(epochs=1000, max_steps=steps, batch_size=16, lr=lr, weight_decay=0.01, max_grad_norm=1.0,
                          seed=args.seed, schedule="linear", warmup=warmup)
        Trainer(b, ds, cfg, on_progress=lambda p: ours.append(round(p.loss, 4))).fit()
        D.Dataset.batch = plain
        model = peft_model(b, args.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        sched = transformers.get_linear_schedule_with_warmup(opt, warmup, steps)
        theirs = []
        for idx in used[:steps]:
            t = {k: torch.from_numpy(v) for k, v in ds.batch(idx).items()}
            loss = torch.nn.functional.cross_entropy(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits, t["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            theirs.append(round(float(loss.detach()), 4))
        runs.append({"lr": lr, "steps": steps, "warmup": warmup, "edgepeft_loss": ours, "torch_peft_loss": theirs,
                     "largest_loss_difference": round(max(abs(a - c) for a, c in zip(ours, theirs)), 4),
                     "torch_largest_loss": max(theirs)})
        print(f"lr {lr:g}, warmup {warmup}: largest per-step loss difference {runs[-1]['largest_loss_difference']}, torch's largest loss "
              f"{runs[-1]['torch_largest_loss']}", file=sys.stderr, flush=True)
        first = used[0]

    # the first step's gradients, same batch, same start
    tr = Trainer(b, ds, TrainConfig(epochs=1, batch_size=16, seed=args.seed))
    tr.delta = tr._fresh_delta()
    tr.params, tr.slots = tr.delta.tensors, HeldSlots(b.manifest.slots)
    tr._sessions()
    _, ours_g = tr._grads([first])
    model = peft_model(b, args.seed)
    t = {k: torch.from_numpy(v) for k, v in ds.batch(first).items()}
    torch.nn.functional.cross_entropy(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits, t["labels"]).backward()
    grads = {}
    for slot in sorted(ours_g):
        a, c = ours_g[slot].ravel(), torch_param(model, slot).grad.numpy().ravel()
        grads[slot] = {"cosine": round(float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c))), 4),
                       "same_sign": round(float(np.mean(np.sign(a) == np.sign(c))), 4)}
    write_result(args.out, {
        "benchmark": "P-tuning (20 tokens, MLP encoder) + head on Rotten Tomatoes: edgepeft int8 vs torch + PEFT fp32, "
                     "same start, same batches",
        "seed": args.seed, "encoder_hidden_size": int(b.manifest.slot(slot_name(PROMPT_MODULE, PT_W0)).shape[0]),
        "load_average": round(os.getloadavg()[0], 2), "first_step_gradients": grads, "runs": runs})
    print(grads)


if __name__ == "__main__":
    main()
