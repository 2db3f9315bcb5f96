"""Why bench_methods warms P-tuning up: edgepeft int8 and torch + PEFT fp32, step by step, from the same start.

For bench_methods' P-tuning bundle and batches: the per-tensor agreement of the first step's gradients (cosine, share
of equal signs: Adam's first steps move every number by about lr times the sign of its gradient), then each side's
training loss per step for each run of ``--runs`` (lr:steps:warmup steps; each side trains the same batches from the
same start, with bench_methods' AdamW and clipping, linear warmup then decay over the run's steps). Writes results/methods_ptuning_lr.json.

    python benchmarks/ptuning_probe.py [--runs 1e-2:30:0,1e-2:30:20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_rotten_tomatoes import data_files  # noqa: E402
from common import minilm_bundle, write_result  # noqa: E402

ENCODER = {"pt_embedding": "embedding.weight", "pt_w0": "mlp_head.0.weight", "pt_b0": "mlp_head.0.bias",
           "pt_w1": "mlp_head.2.weight", "pt_b1": "mlp_head.2.bias", "pt_w2": "mlp_head.4.weight", "pt_b2": "mlp_head.4.bias"}


def torch_model(b, seed: int):
    """torch + PEFT's P-tuning model started where edgepeft starts (the bench_methods torch child's setup)."""
    import torch
    import transformers
    from peft import PeftConfig, get_peft_model
    from safetensors.torch import load_file

    from edgepeft.delta import delta_from_init
    from edgepeft.delta.peft_format import to_peft
    from edgepeft.demo.assets import minilm_dir
    from edgepeft.runtime.weights import read_frozen

    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers.logging.set_verbosity_error()
    start = delta_from_init(b.manifest, seed)
    adapter = tempfile.mkdtemp()
    to_peft(start, b.manifest, adapter, base_weights=read_frozen(b))
    cfg = PeftConfig.from_pretrained(adapter)
    cfg.inference_mode = False
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, attn_implementation="eager")
    model = get_peft_model(model, cfg)
    enc = model.prompt_encoder["default"]
    with torch.no_grad():
        for k, v in start.tensors.items():
            module, _, kind = k.rpartition(".")
            if module == "prompt_encoder":
                enc.get_parameter(ENCODER[kind]).copy_(torch.from_numpy(v))
        for k, v in load_file(os.path.join(adapter, "adapter_model.safetensors")).items():  # the bundle's head
            if k != "prompt_embeddings":
                module, _, leaf = k.removeprefix("base_model.").rpartition(".")
                getattr(model.base_model.get_submodule(module).modules_to_save["default"], leaf).copy_(v)
    model.eval()
    return model


def torch_param(model, slot: str):
    module, _, kind = slot.rpartition(".")
    if module == "prompt_encoder":
        return model.prompt_encoder["default"].get_parameter(ENCODER[kind])
    return getattr(model.base_model.classifier.modules_to_save["default"], kind)


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

    b = open_bundle(minilm_bundle("int8", "ptuning+head", top_layers=None, rank=None))  # bench_methods' bundle
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
        model = torch_model(b, args.seed)
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
    model = torch_model(b, args.seed)
    t = {k: torch.from_numpy(v) for k, v in ds.batch(first).items()}
    torch.nn.functional.cross_entropy(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits, t["labels"]).backward()
    grads = {}
    for slot in sorted(ours_g):
        a, c = ours_g[slot].ravel(), torch_param(model, slot).grad.numpy().ravel()
        grads[slot] = {"cosine": round(float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c))), 4),
                       "same_sign": round(float(np.mean(np.sign(a) == np.sign(c))), 4)}
    write_result("methods_ptuning_lr", {
        "benchmark": "P-tuning (20 tokens, MLP encoder) + head on Rotten Tomatoes: edgepeft int8 vs torch + PEFT fp32, "
                     "same start, same batches",
        "load_average": round(os.getloadavg()[0], 2), "first_step_gradients": grads, "runs": runs})
    print(grads)


if __name__ == "__main__":
    main()
