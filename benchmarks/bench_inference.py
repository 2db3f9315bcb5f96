"""Inference latency per call (batch 1, 32 tokens): base only, one active LoRA, a mix of two; edgepeft vs torch + PEFT.

edgepeft: ``Predictor.logits`` on the default bundle's inference graph, the delta (or the weighted mix
of two) chosen per call through the graph's delta inputs. torch + PEFT: a PeftModel with two LoRA
adapters (r=8, query/value) in eval mode under ``inference_mode``, SDPA attention; base with
``disable_adapter()``, one adapter with ``set_adapter("a")``, two with ``base_model.set_adapter(["a", "b"])``.
Median of ``--calls`` calls after warm-up, each engine in its own process, rounds alternating.

    python benchmarks/bench_inference.py [--calls 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import DEFAULT_BUNDLE, alternate, median, minilm_bundle, write_result  # noqa: E402

LENGTH = 32

EDGEPEFT_CHILD = """
import json, os, sys, time, numpy as np
from edgepeft.delta import Delta, delta_from_init
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.infer import Predictor
b = open_bundle(sys.argv[1]); calls, T = int(sys.argv[2]), int(sys.argv[3])
p = Predictor(b)
rss_load = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
g = np.random.default_rng(0)
def trained(seed):
    d = delta_from_init(b.manifest, seed)
    return Delta({k: (v if k.endswith("lora_A") else g.normal(0, 0.02, v.shape).astype(np.float32)) for k, v in d.tensors.items()}, d.meta)
a, c = trained(1), trained(2)
ids = g.integers(1000, 30000, (1, T)); mask = np.ones_like(ids)
out = {}
for name, deltas, w in (("base", [], None), ("one LoRA", [a], None), ("mix of two", [a, c], [0.5, 0.5])):
    for _ in range(10): p.logits(ids, mask, deltas, w)
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter(); p.logits(ids, mask, deltas, w); ts.append(time.perf_counter() - t0)
    out[name] = float(np.median(ts))
print("RESULT", json.dumps({"ms": {k: v * 1000 for k, v in out.items()}, "rss_after_load_mb": rss_load}))
"""

TORCH_CHILD = """
import json, os, sys, time, numpy as np, torch, transformers
os.environ["HF_HUB_OFFLINE"] = "1"
from peft import LoraConfig, get_peft_model
from edgepeft.demo.assets import minilm_dir
transformers.logging.set_verbosity_error()
calls, T = int(sys.argv[2]), int(sys.argv[3])
m = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, attn_implementation="sdpa").eval()
cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
m = get_peft_model(m, cfg, adapter_name="a"); m.add_adapter("b", cfg); m.eval()
rss_load = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
g = np.random.default_rng(0)
ids = torch.from_numpy(g.integers(1000, 30000, (1, T))); mask = torch.ones_like(ids)
def run(): return m(input_ids=ids, attention_mask=mask).logits
out = {}
with torch.inference_mode():
    for name in ("base", "one LoRA", "mix of two"):
        if name == "one LoRA": m.set_adapter("a")
        if name == "mix of two": m.base_model.set_adapter(["a", "b"])
        def call():
            if name == "base":
                with m.disable_adapter(): return run()
            return run()
        for _ in range(10): call()
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter(); call(); ts.append(time.perf_counter() - t0)
        out[name] = float(np.median(ts))
print("RESULT", json.dumps({"ms": {k: v * 1000 for k, v in out.items()}, "rss_after_load_mb": rss_load}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200, help="timed calls per case and process")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per engine")
    ap.add_argument("--quick", action="store_true", help="1 round of 20 calls")
    args = ap.parse_args(argv)
    if args.quick:
        args.calls, args.rounds = 20, 1
    engines = {"torch+peft fp32 (SDPA)": (TORCH_CHILD, ""),
               f"edgepeft {DEFAULT_BUNDLE['quantize']}": (EDGEPEFT_CHILD, str(minilm_bundle(**DEFAULT_BUNDLE)))}
    runs = alternate({name: (code, [arg, str(args.calls), str(LENGTH)]) for name, (code, arg) in engines.items()},
                     args.rounds, lambda name, res: f"base {res['ms']['base']:.2f} ms")
    rows = []
    for name, rs in runs.items():
        row = {"config": name, "peak_rss_mb": round(median([x["peak_rss_mb"] for x in rs]), 1),
               "rss_after_load_mb": round(median([x["rss_after_load_mb"] for x in rs]), 1)}
        for case in ("base", "one LoRA", "mix of two"):
            row[f"{case} ms"] = round(median([x["ms"][case] for x in rs]), 2)
        rows.append(row)
    for r in rows:
        for case in ("base", "one LoRA", "mix of two"):
            r[f"{case} ratio_vs_torch"] = round(r[f"{case} ms"] / rows[0][f"{case} ms"], 3)
    write_result("inference", {"benchmark": f"inference latency per call, batch 1, {LENGTH} tokens, all-MiniLM-L6-v2",
                               "calls": args.calls, "rounds": args.rounds, "rows": rows, "raw": runs})
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
