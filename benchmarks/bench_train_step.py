"""One training step of all-MiniLM-L6-v2 at batch 8, length 128: torch + PEFT against edgepeft, side by side.

Same work on both sides: LoRA r=8 (alpha 16) on query and value, BitFit bias deltas on the other
non-key linear layers, a 2-class head; forward, loss, backward, AdamW. torch runs in eval mode (no
dropout) because edgepeft's graphs have none. Each configuration runs in its own process; rounds
alternate the order so machine noise hits every side alike. Reported: median step time, peak RSS,
RSS after load, and the share of this machine's fp32 peak that the step's FLOPs reach.

    python benchmarks/bench_train_step.py [--rounds 3] [--steps 8] [--top-layers 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import FP32_PEAK_GFLOPS, alternate, median, minilm_bundle, write_result  # noqa: E402

BATCH, LENGTH = 8, 128
TOP_LAYERS = 2  # the top-k variant both sides also run

TORCH_CHILD = """
import json, os, sys, time, numpy as np, torch, transformers
os.environ["HF_HUB_OFFLINE"] = "1"
from peft import LoraConfig, get_peft_model
from edgepeft.demo.assets import minilm_dir
attn, steps, top, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
transformers.logging.set_verbosity_error()
model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, attn_implementation=attn)
layers = list(range(6 - top, 6)) if top else list(range(6))
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="SEQ_CLS",
                                         target_modules=["query", "value"], layers_to_transform=layers))
for n, p in model.named_parameters():  # BitFit on the same biases edgepeft trains (not key: zero gradient)
    if n.endswith("bias") and ".layer." in n and ".key." not in n and "LayerNorm" not in n and int(n.split(".layer.")[1].split(".")[0]) in layers:
        p.requires_grad_(True)
model.eval()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
rss_load = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
g = np.random.default_rng(0)
ids = torch.from_numpy(g.integers(1000, 30000, (B, T)))
mask = torch.ones(B, T, dtype=torch.long)
labels = torch.from_numpy(g.integers(0, 2, (B,)))
times = []
for i in range(steps + 2):
    t0 = time.perf_counter()
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
print("RESULT", json.dumps({"step_s": float(np.median(times[2:])), "rss_after_load_mb": rss_load}))
"""

EDGEPEFT_CHILD = """
import json, os, sys, time, numpy as np
from edgepeft.delta import delta_from_init
from edgepeft.names import grad_name
from edgepeft.runtime.bundle import SessionConfig, open_bundle
from edgepeft.runtime.optim import AdamW
path, steps, options, B, T = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
b = open_bundle(path)
sess = b.session("train", SessionConfig(**options))
rss_load = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
params = dict(delta_from_init(b.manifest, seed=0).tensors)
opt = AdamW(params, weight_decay=0.01)
g = np.random.default_rng(0)
feeds = {"input_ids": g.integers(1000, 30000, (B, T)), "attention_mask": np.ones((B, T), np.int64),
         "labels": g.integers(0, 2, (B,))}
names = [s.name for s in b.manifest.slots]
outs = ["loss"] + [grad_name(n) for n in names]
times = []
for i in range(steps + 2):
    t0 = time.perf_counter()
    res = sess.run(outs, {**feeds, **params})
    opt.step(dict(zip(names, res[1:])), 1e-4)
    times.append(time.perf_counter() - t0)
print("RESULT", json.dumps({"step_s": float(np.median(times[2:])), "rss_after_load_mb": rss_load}))
"""


def step_gflop(layers_backward: int = 6, batch: int = BATCH, length: int = LENGTH, hidden: int = 384, inter: int = 1536,
               layers: int = 6) -> float:
    """Forward through every layer plus activation gradients through the trained ones (no weight gradients)."""
    bt = batch * length
    per_layer = 4 * 2 * bt * hidden * hidden + 2 * 2 * bt * hidden * inter + 2 * 2 * batch * length * length * hidden
    return (layers + layers_backward) * per_layer / 1e9


def torch_config(attn: str, steps: int, top: int = 0, batch: int = BATCH, length: int = LENGTH) -> tuple[str, list[str]]:
    return TORCH_CHILD, [attn, str(steps), str(top), str(batch), str(length)]


def edgepeft_config(bundle, steps: int, batch: int = BATCH, length: int = LENGTH, **session) -> tuple[str, list[str]]:
    """A train-step child on ``bundle`` with SessionConfig(**session) (threads, arena, optimization)."""
    return EDGEPEFT_CHILD, [str(bundle), str(steps), json.dumps(session), str(batch), str(length)]


def rows_from(runs: dict[str, list[dict]], backward_layers: dict[str, int], ref: str, batch: int = BATCH,
              length: int = LENGTH) -> list[dict]:
    """Medians per configuration and the ratios to ``ref``."""
    rows = []
    for name, rs in runs.items():
        step = median([x["step_s"] for x in rs])
        gflop = step_gflop(backward_layers[name], batch, length)
        rows.append({
            "config": name, "step_ms": round(step * 1000, 1),
            "peak_rss_mb": round(median([x["peak_rss_mb"] for x in rs]), 1),
            "rss_after_load_mb": round(median([x["rss_after_load_mb"] for x in rs]), 1),
            "gflop": round(gflop, 1), "share_of_fp32_peak": round(gflop / step / FP32_PEAK_GFLOPS, 3),
        })
    base = next(r for r in rows if r["config"] == ref)
    for r in rows:
        r["step_ratio"] = round(r["step_ms"] / base["step_ms"], 3)
        r["peak_ratio"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
    return rows


def print_table(rows: list[dict], ref: str) -> None:
    print(f"| configuration | step ms | × {ref} | peak RSS MB | × | RSS after load MB | GFLOP | share of fp32 peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['step_ms']} | {r['step_ratio']} | {r['peak_rss_mb']} | {r['peak_ratio']} | "
              f"{r['rss_after_load_mb']} | {r['gflop']} | {r['share_of_fp32_peak']:.0%} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per configuration")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per process (after 2 warm-up steps)")
    ap.add_argument("--top-layers", type=int, default=TOP_LAYERS, help="also run both sides training only the last N layers (0: not)")
    ap.add_argument("--quick", action="store_true", help="1 round, 1 step, 3 configurations")
    args = ap.parse_args(argv)
    k = args.top_layers
    if args.quick:
        args.rounds, args.steps = 1, 1
    configs = {
        "torch+peft fp32, eager attention": (torch_config("eager", args.steps), 6),
        "torch+peft fp32, SDPA attention": (torch_config("sdpa", args.steps), 6),
        "edgepeft fp32": (edgepeft_config(minilm_bundle("none"), args.steps), 6),
        "edgepeft int8": (edgepeft_config(minilm_bundle("int8"), args.steps), 6),
        "edgepeft int4": (edgepeft_config(minilm_bundle("int4"), args.steps), 6),
    }
    if k:
        configs[f"torch+peft fp32 SDPA, top {k} layers"] = (torch_config("sdpa", args.steps, k), k)
        configs[f"edgepeft int8, top {k} layers"] = (edgepeft_config(minilm_bundle("int8", top_layers=k), args.steps), k)
    if args.quick:
        configs = {n: c for n, c in configs.items() if n.startswith(("torch+peft fp32, eager", "edgepeft int8"))}
    ref = "torch+peft fp32, eager attention"
    runs = alternate({n: c for n, (c, _) in configs.items()}, args.rounds,
                     lambda n, r: f"{r['step_s'] * 1000:.0f} ms, peak {r['peak_rss_mb']:.0f} MB")
    rows = rows_from(runs, {n: back for n, (_, back) in configs.items()}, ref)
    write_result("train_step", {"benchmark": f"train step, all-MiniLM-L6-v2, batch {BATCH}, length {LENGTH}",
                                "reference": ref, "rounds": args.rounds, "steps": args.steps, "rows": rows, "raw": runs})
    print_table(rows, "torch eager")


if __name__ == "__main__":
    main()
