"""Where a train step's time goes: onnxruntime's per-operator profile of edgepeft's step, torch.profiler of PEFT's.

Shape: batch 16, length 48 (a Rotten Tomatoes batch). edgepeft runs the default bundle's train graph
with session profiling on; torch + PEFT runs the usual recipe's step (LoRA r=8 q/v, every layer, SDPA,
train mode) under ``torch.profiler``. Reported per side: the share of step time of the top operator
types, so a missed target can be traced to the work that remains (matrix products vs the rest).

    python benchmarks/bench_profile.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import DEFAULT_BUNDLE, minilm_bundle, run_child, write_result  # noqa: E402

BATCH, LENGTH, TOP = 16, 48, 12

ORT_CHILD = """
import json, sys, tempfile, collections, numpy as np, onnxruntime as ort
from edgepeft.delta import delta_from_init
from edgepeft.names import grad_name
from edgepeft.runtime.bundle import SessionConfig, open_bundle
path, steps, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
b = open_bundle(path)
so = SessionConfig().options(); so.enable_profiling = True; so.profile_file_prefix = tempfile.mkdtemp() + "/ort"
sess = ort.InferenceSession(str(b.graph_path("train")), so, providers=["CPUExecutionProvider"])
params = dict(delta_from_init(b.manifest, seed=0).tensors)
g = np.random.default_rng(0)
feeds = {"input_ids": g.integers(1000, 30000, (B, T)), "attention_mask": np.ones((B, T), np.int64), "labels": g.integers(0, 2, (B,)), **params}
outs = ["loss"] + [grad_name(s.name) for s in b.manifest.slots]
for _ in range(2 + steps): sess.run(outs, feeds)
events = json.load(open(sess.end_profiling()))
runs = [e for e in events if e.get("name") == "model_run"][2:]
by_op, nodes = collections.Counter(), 0
start = runs[0]["ts"]
for e in events:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
        by_op[e["args"]["op_name"]] += e["dur"]; nodes += 1
total = sum(r["dur"] for r in runs)
print("RESULT", json.dumps({"step_ms": total / len(runs) / 1000, "kernel_ms": sum(by_op.values()) / len(runs) / 1000,
                            "by_op_ms": {k: v / len(runs) / 1000 for k, v in by_op.most_common()}}))
"""

TORCH_CHILD = """
import json, os, sys, collections, numpy as np, torch, transformers
os.environ["HF_HUB_OFFLINE"] = "1"
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from edgepeft.demo.assets import minilm_dir
transformers.logging.set_verbosity_error()
steps, B, T = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, attn_implementation="sdpa")
m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="SEQ_CLS", target_modules=["query", "value"]))
m.train()
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
g = np.random.default_rng(0)
ids = torch.from_numpy(g.integers(1000, 30000, (B, T))); mask = torch.ones(B, T, dtype=torch.long); y = torch.from_numpy(g.integers(0, 2, (B,)))
def step():
    loss = torch.nn.functional.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, y)
    loss.backward(); opt.step(); opt.zero_grad()
for _ in range(2): step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps): step()
by_op = collections.Counter()
for e in prof.key_averages():
    by_op[e.key] += e.self_cpu_time_total
total = sum(by_op.values())
print("RESULT", json.dumps({"step_ms": total / steps / 1000, "kernel_ms": total / steps / 1000,
                            "by_op_ms": {k: v / steps / 1000 for k, v in by_op.most_common()}}))
"""


def shares(res: dict) -> list[dict]:
    total = sum(res["by_op_ms"].values())
    top = list(res["by_op_ms"].items())[:TOP]
    rows = [{"op": k, "ms_per_step": round(v, 2), "share": round(v / total, 3)} for k, v in top]
    rest = total - sum(v for _, v in top)
    return rows + [{"op": "(all other)", "ms_per_step": round(rest, 2), "share": round(rest / total, 3)}]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--quick", action="store_true", help="1 profiled step")
    args = ap.parse_args(argv)
    steps = 1 if args.quick else args.steps
    bundle = minilm_bundle(**DEFAULT_BUNDLE)
    ours = run_child(ORT_CHILD, str(bundle), str(steps), str(BATCH), str(LENGTH))
    theirs = run_child(TORCH_CHILD, "", str(steps), str(BATCH), str(LENGTH))
    rows = [{"config": f"edgepeft {bundle.name} (onnxruntime profile)", "step_ms": round(ours["step_ms"], 1),
             "ops": shares(ours)},
            {"config": "torch+peft usual recipe (torch.profiler, self CPU time)", "step_ms": round(theirs["step_ms"], 1),
             "ops": shares(theirs)}]
    write_result("profile", {"benchmark": f"per-operator time of one train step, batch {BATCH}, length {LENGTH}",
                             "rows": rows, "raw": {"edgepeft": ours, "torch": theirs}})
    for r in rows:
        print(f"{r['config']}: {r['step_ms']} ms/step")
        for o in r["ops"]:
            print(f"   {o['op']:<40} {o['ms_per_step']:>8} ms  {o['share']:.0%}")


if __name__ == "__main__":
    main()
