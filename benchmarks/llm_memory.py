"""Where a causal LM's train step spends memory: live tensors at the peak, and the process's RSS per session setting.

Two measurements of one bundle's train.onnx at batch 4 x 256 tokens (what bench_llm.py trains):

1. Live tensors. One step runs with onnxruntime's profiler on and its optimized graph saved; the
   profile gives the order nodes ran in and every output's shape, the graph gives every tensor's
   last reader, so the bytes alive after each node follow exactly (arena and allocator aside). At
   the peak they are grouped by what they are: fp32 copies of frozen weights (DequantizeLinear),
   logits blocks of the loss, attention probabilities, MLP activations, hidden states, the rest.
2. Process memory. Each onnxruntime setting (arena, memory pattern, glibc's allocator told to give
   freed blocks back) in a fresh process: RSS with the train session loaded, peak over two steps,
   the second step's time.

    python benchmarks/llm_memory.py [--bundle B] [--name N] [--settings all|default|onnxruntime]

Prints the breakdown and writes benchmarks/results/llm_memory.json (and the printout beside it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, run_child, write_result  # noqa: E402

BATCH, LENGTH = 4, 256

# One train step with profiling; prints the live-tensor curve's peak and what is alive there.
LIVE = r"""
import glob, json, re, sys, tempfile
from collections import defaultdict, deque
import numpy as np, onnx, onnxruntime as ort
from edgepeft.delta import delta_from_init
from edgepeft.runtime.bundle import SessionConfig, open_bundle
from edgepeft.runtime.lm_targets import loss_chunks, train_feeds
bundle, batch, length = open_bundle(sys.argv[1], verify=False), int(sys.argv[2]), int(sys.argv[3])
m = bundle.manifest
work = tempfile.mkdtemp()
so = SessionConfig().for_graph('train', m.task).options()  # the train session's defaults
so.optimized_model_filepath = work + '/opt.onnx'
so.add_session_config_entry('session.optimized_model_external_initializers_file_name', 'opt.data')
so.add_session_config_entry('session.optimized_model_external_initializers_min_size_in_bytes', '1024')
so.enable_profiling = True
so.profile_file_prefix = work + '/prof'
s = ort.InferenceSession(str(bundle.graph_path('train')), so, providers=['CPUExecutionProvider'])
ids = np.random.default_rng(0).integers(3, m.vocab_size, (batch, length))
s.run(None, {**train_feeds({'input_ids': ids, 'attention_mask': np.ones_like(ids)}, loss_chunks(s)),
             **delta_from_init(m, 0).tensors})
events = [e for e in json.load(open(s.end_profiling())) if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time')]
g = onnx.load(work + '/opt.onnx', load_external_data=False).graph
named = {n.name: n for n in g.node if n.name}
nameless = defaultdict(deque)  # the profile calls an unnamed node <op>_<index>: match those in order per op
for n in g.node:
    if not n.name:
        nameless[n.op_type].append(n)
BYTES = {'float': 4, 'int64': 8, 'int32': 4, 'bool': 1, 'int8': 1, 'uint8': 1, 'float16': 2, 'double': 8}
order, size, made, shape = [], {}, {}, {}
for i, e in enumerate(events):
    key = e['name'][:-len('_kernel_time')]
    node = named[key] if key in named else nameless[e['args']['op_name']].popleft()
    order.append(node)
    for out, ts in zip(node.output, e['args'].get('output_type_shape', [])):
        (dt, shp), = ts.items()
        size[out], made[out], shape[out] = int(np.prod(shp, dtype=np.int64)) * BYTES.get(dt, 4), i, shp
# a Reshape/Squeeze/Unsqueeze/Flatten/Identity output shares its input's buffer: one buffer, alive until its last view's reader
root = {}
for n in order:
    if n.op_type in ('Reshape', 'Squeeze', 'Unsqueeze', 'Flatten', 'Identity') and n.input[0] in made:
        for out in n.output:
            root[out] = root.get(n.input[0], n.input[0])
outputs = {o.name for o in g.output}
end = {}
for i, n in enumerate(order):
    for x in n.input:
        if x in made:
            end[root.get(x, x)] = i
for o in outputs & set(made):
    end[root.get(o, o)] = len(order) - 1
buffers = {o: i for o, i in made.items() if o not in root}
alive = np.zeros(len(order) + 1)
for o, i in buffers.items():
    end.setdefault(o, i)
    alive[i] += size[o]; alive[end[o] + 1] -= size[o]
curve = np.cumsum(alive)[:-1]
peak = int(curve.argmax())
V = m.vocab_size
from edgepeft.exporters.causal_lm import HEAD_BLOCKS  # the loss's (N, V/J) logits blocks (before issue 16's end: (M, V))
def kind(o):
    node, shp = order[made[o]], shape[o]
    if node.op_type == 'DequantizeLinear':
        return 'fp32 copies of frozen weights (DequantizeLinear)'
    if shp and len(shp) == 2 and shp[-1] in (V, -(-V // HEAD_BLOCKS)):
        return 'logits blocks of the loss'
    if len(shp) == 4 and shp[-1] == shp[-2] == length:
        return 'attention scores/probabilities (B, heads, T, T)'
    if shp and len(shp) >= 2 and int(np.prod(shp)) == batch * length * shp[-1] and shp[-1] > 1024:
        return 'MLP activations (B, T, intermediate)'
    return 'hidden states, q/k/v and the rest'
groups, counts = defaultdict(int), defaultdict(int)
for o, i in buffers.items():
    if i <= peak <= end[o]:
        groups[kind(o)] += size[o]; counts[kind(o)] += 1
MB = 2 ** 20
print('RESULT', json.dumps({
    'nodes': len(order), 'peak_live_mb': round(curve[peak] / MB, 1), 'peak_node': f'{order[peak].op_type} ({peak}/{len(order)})',
    'alive_at_peak_mb': {k: round(v / MB, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
    'tensors_at_peak': dict(counts),
    'dequantize_nodes': sum(n.op_type == 'DequantizeLinear' for n in g.node)}))
"""

# RSS of one session setting in a fresh process: loaded, peak over two steps, the second step's seconds.
RSS = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
from edgepeft.runtime.allocator import lean_allocator
from edgepeft.delta import delta_from_init
from edgepeft.runtime import memory
from edgepeft.runtime.bundle import SessionConfig, open_bundle
from edgepeft.runtime.lm_targets import loss_chunks, train_feeds
bundle, batch, length = open_bundle(sys.argv[1], verify=False), int(sys.argv[2]), int(sys.argv[3])
arena, pattern, lean = (x == '1' for x in sys.argv[4:7])
if lean:
    lean_allocator()
# built here, not by bundle.session (which always makes the allocator lean for training): every setting measured
s = ort.InferenceSession(str(bundle.graph_path('train')), SessionConfig(arena=arena, mem_pattern=pattern).options(),
                         providers=['CPUExecutionProvider'])
ids = np.random.default_rng(0).integers(3, bundle.manifest.vocab_size, (batch, length))
feeds = {**train_feeds({'input_ids': ids, 'attention_mask': np.ones_like(ids)}, loss_chunks(s)),
         **delta_from_init(bundle.manifest, 0).tensors}
loaded = memory.rss_mb()
memory._reset_peak()
for _ in range(2):
    t0 = time.perf_counter(); s.run(None, feeds); dt = time.perf_counter() - t0
print('RESULT', json.dumps({'loaded_mb': round(loaded), 'step_peak_mb': round(memory._own_peak_mb()), 'step_s': round(dt, 2)}))
"""

SETTINGS = {  # name: (arena, memory pattern, lean glibc allocator)
    "arena on, pattern on (onnxruntime's defaults)": (1, 1, 0),
    "arena off, pattern on": (0, 1, 0),
    "arena on, pattern off": (1, 0, 0),
    "arena off, pattern off": (0, 0, 0),
    "arena off, pattern off, lean allocator": (0, 0, 1),
    "arena on, pattern off, lean allocator": (1, 0, 1),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="a causal-LM bundle (default: bench_llm's SmolLM2-135M int8 bundle)")
    ap.add_argument("--name", default="llm_memory", help="results/<name>.json")
    ap.add_argument("--settings", default="all",
                    help="'all', 'default' (the train session's defaults) or 'onnxruntime' (onnxruntime's own defaults)")
    args = ap.parse_args(argv)
    if args.bundle is None:
        from bench_llm import smollm2_bundle

        args.bundle = smollm2_bundle("int8")[0]
    shape = [str(args.bundle.resolve()), str(BATCH), str(LENGTH)]
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"{args.bundle.name}: train step at batch {BATCH} x {LENGTH}, the train session's default settings")
    live = run_child(LIVE, *shape, timeout=3600)
    say(f"live tensors: peak {live['peak_live_mb']} MB after {live['peak_node']}; alive there:")
    for k, v in live["alive_at_peak_mb"].items():
        say(f"  {v:8.1f} MB  {k}")
    say("process RSS per setting (fresh process each):")
    rss = {}
    for name, flags in SETTINGS.items():
        if (args.settings, flags) in {("default", f) for f in SETTINGS.values() if f != (1, 0, 1)} | \
                {("onnxruntime", f) for f in SETTINGS.values() if f != (1, 1, 0)}:
            continue
        rss[name] = run_child(RSS, *shape, *map(str, flags), timeout=3600)
        r = rss[name]
        say(f"  {name:45s} loaded {r['loaded_mb']:5d} MB, step peak {r['step_peak_mb']:5d} MB, step {r['step_s']} s")
    (RESULTS / f"{args.name}.txt").write_text("\n".join(lines) + "\n")
    print(write_result(args.name, {"bundle": args.bundle.name, "batch": BATCH, "length": LENGTH, "live": live, "rss": rss}))


if __name__ == "__main__":
    main()
