"""Where a CNN bundle's train step goes: onnxruntime's per-operator profile, with wall and CPU seconds per step.

Runs the train graph as the trainer does (cut to the loss and the trained gradients), on random inputs of the
bundle's shape, in a fresh process per bundle: kernel time per operator kind (ms a step and share), and the
median step's wall and CPU seconds (time.process_time: on a shared machine the wall clock measures the queue).
This is how the KWS CNN's step was found spending a third of its kernel time in MaxPool-with-indices and
ScatterElements and most of its convolution time in weight gradients written as giant-kernel convolutions
(exporters/pool_grad.py, exporters/conv_grad.py).

    python benchmarks/bench_cnn_profile.py BUNDLE [BUNDLE ...] [--batch 16] [--threads 1] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import run_child, write_result  # noqa: E402

CHILD = """
import collections, json, sys, tempfile, time
import numpy as np, onnxruntime as ort
from edgepeft.delta import delta_from_init
from edgepeft.names import CNN_INPUTS, LABELS, LOSS, grad_name
from edgepeft.onnx_prune import prune_outputs
from edgepeft.runtime.bundle import SessionConfig, open_bundle
from edgepeft.runtime.trainer import _cnn_input_shape
b, a = open_bundle(sys.argv[1]), json.loads(sys.argv[2])
m = b.manifest
outs = [LOSS] + [grad_name(s.name) for s in m.slots]
so = SessionConfig(threads=a["threads"], dequantize_at_load=a.get("dequantize"), mem_pattern=a.get("pattern"),
                   optimization=a.get("optimization", "all")).for_graph("train", m.task).options()
if not a.get("spin", True):
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
so.enable_profiling, so.profile_file_prefix = a["profile"], tempfile.mkdtemp() + "/ort"
so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(b.path))
for k, v in b.shared_weights.items():
    so.add_initializer(k, v)
sess = ort.InferenceSession(prune_outputs(b.graph_path("train").read_bytes(), set(outs)), so, providers=["CPUExecutionProvider"])
g = np.random.default_rng(0)
feeds = {CNN_INPUTS[m.task]: g.standard_normal((a["batch"], *_cnn_input_shape(m))).astype(np.float32),
         LABELS: g.integers(0, len(m.labels), a["batch"]), **delta_from_init(m, 0).tensors}
for _ in range(2):
    sess.run(outs, feeds)
wall, cpu = [], []
for _ in range(a["steps"]):
    t0, c0 = time.perf_counter(), time.process_time()
    sess.run(outs, feeds)
    wall.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
ops = collections.Counter()
if a["profile"]:
    for e in json.load(open(sess.end_profiling())):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ops[e["args"]["op_name"]] += e["dur"] / 1000 / (a["steps"] + 2)
import resource
print("RESULT", json.dumps({"wall_step_s": float(np.median(wall)), "cpu_step_s": float(np.median(cpu)), "ops_ms": dict(ops),
                            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="cnn_profile")
    a = ap.parse_args(argv)
    rows, load = [], [round(os.getloadavg()[0], 1)]
    for path in a.bundles:
        args = {"batch": a.batch, "threads": a.threads, "steps": a.steps}
        timed = run_child(CHILD, str(path), json.dumps({**args, "profile": False}))  # the profiler's own cost not timed
        prof = run_child(CHILD, str(path), json.dumps({**args, "profile": True}))
        total = sum(prof["ops_ms"].values())
        ops = sorted(prof["ops_ms"].items(), key=lambda kv: -kv[1])
        rows.append({"bundle": path.name, "wall_step_s": round(timed["wall_step_s"], 4), "cpu_step_s": round(timed["cpu_step_s"], 4),
                     "ops": [{"op": k, "ms": round(v, 2), "share": round(v / total, 3)} for k, v in ops]})
        print(f"{path.name}: {1000 * timed['wall_step_s']:.1f} ms wall, {1000 * timed['cpu_step_s']:.1f} ms CPU a step; "
              + ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in ops[:8]), flush=True)
    load.append(round(os.getloadavg()[0], 1))
    print(f"wrote {write_result(a.out, {'settings': vars(a) | {'bundles': [p.name for p in a.bundles]}, 'load_average_1min': load, 'rows': rows})}")


if __name__ == "__main__":
    main()
