"""Does a sized onnxruntime arena keep a CNN train step's memory low without the lean allocator's re-faults?

``--memory-budget`` trained with onnxruntime's CPU arena off and glibc told to hand freed memory back
(runtime/allocator.py; text bundles still do, CNN bundles now train in the capped shared arena measured here):
the peak stays low, but every step faults its activations in again (bench_speech: 2.6-3.2x
torch's step with the budget, 1.03-1.05x without). This runs the KWS bundle's train step (loss and every gradient;
one thread, batch 16) in four configurations, each its own process, and reports the median step and the peak and
final RSS: the arena off (the budget's), onnxruntime's default arena (extends by powers of two), an arena that
extends by exactly what is requested (``kSameAsRequested``), and that arena capped at ``--cap`` MB (a hard limit:
onnxruntime fails an allocation beyond it).

    python benchmarks/bench_arena.py BUNDLE [--steps 40] [--batch 16] [--cap 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import run_child, write_result  # noqa: E402

CONFIGS = {  # name -> (session arena, env arena strategy or None, cap MB or None)
    "arena off, lean allocator (--memory-budget)": (False, None, None),
    "onnxruntime's default arena (kNextPowerOfTwo)": (True, None, None),
    "arena kSameAsRequested": (True, 1, None),
    "arena kSameAsRequested, capped": (True, 1, "cap"),
    "arena kNextPowerOfTwo, capped": (True, 0, "cap"),
}

CHILD = """
import json, sys, time
import numpy as np
import onnxruntime as ort
from edgepeft.delta import delta_from_init
from edgepeft.names import CNN_INPUTS, LABELS, LOSS, grad_name
from edgepeft.runtime import bundle as B
args = json.loads(sys.argv[2])
if args["strategy"] is not None:  # one arena for the process, shared by sessions that ask for env allocators
    mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(mem, ort.OrtArenaCfg(int((args["cap_mb"] or 0) * 2**20), args["strategy"], -1, -1))
    plain = B.SessionConfig.options
    def options(self):
        so = plain(self)
        so.add_session_config_entry("session.use_env_allocators", "1")
        return so
    B.SessionConfig.options = options
bundle = B.open_bundle(sys.argv[1])
m = bundle.manifest
names = [s.name for s in m.slots]
sess = bundle.session("train", B.SessionConfig(threads=args.get("threads", 1), arena=args["arena"]))
delta = delta_from_init(m, 0)
shape = sess.get_inputs()[0].shape
rng = np.random.default_rng(0)
feeds = {CNN_INPUTS[m.task]: rng.standard_normal((args["batch"], *shape[1:])).astype(np.float32),
         LABELS: rng.integers(0, len(m.labels), args["batch"]), **{n: np.asarray(delta.tensors[n]) for n in names}}
outputs = [LOSS, *map(grad_name, names)]
sess.run(outputs, feeds)  # the first step builds kernels: untimed, as in the benchmarks
times = []
for _ in range(args["steps"]):
    t0 = time.perf_counter()
    sess.run(outputs, feeds)
    times.append(time.perf_counter() - t0)
print("RESULT", json.dumps({"step_s": float(np.median(times))}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cap", type=float, default=64, help="The capped arena's max_mem (MB).")
    ap.add_argument("--rounds", type=int, default=3, help="Processes per configuration (alternating order).")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime's intra-op threads.")
    ap.add_argument("--configs", default=";".join(CONFIGS), help="Which configurations (names separated by semicolons).")
    ap.add_argument("--out", default="arena", help="Result name under benchmarks/results.")
    a = ap.parse_args(argv)
    configs = {k: CONFIGS[k] for k in a.configs.split(";")}
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    load = [os.getloadavg()[0]]
    for r in range(a.rounds):
        for name in (list(configs) if r % 2 == 0 else list(reversed(configs))):
            arena, strategy, cap = configs[name]
            args = {"arena": arena, "strategy": strategy, "cap_mb": a.cap if cap else None, "steps": a.steps, "batch": a.batch,
                    "threads": a.threads}
            res = run_child(CHILD, str(a.bundle), json.dumps(args))
            runs[name].append(res)
            print(f"{name}: {res['step_s'] * 1000:.1f} ms a step, peak {res['peak_rss_mb']:.0f} MB, end {res['rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
        load.append(os.getloadavg()[0])
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    rows = [{"config": k, "step_s": round(med([r["step_s"] for r in v]), 5), "peak_rss_mb": round(med([r["peak_rss_mb"] for r in v]), 1),
             "end_rss_mb": round(med([r["rss_mb"] for r in v]), 1), "runs": v} for k, v in runs.items()]
    path = write_result(a.out, {"bundle": a.bundle.name, "settings": {k: v for k, v in vars(a).items() if k not in ("bundle", "configs", "out")},
                                  "load_average_1min": [round(x, 1) for x in load], "rows": rows})
    print(table(json.loads(path.read_text())))
    print(f"wrote {path}")


def table(payload: dict) -> str:
    """README's arena table (tests/test_readme_figures.py checks README against it)."""
    st = payload["settings"]
    model = "EfficientNet-Lite0" if payload["bundle"].startswith("effnet") else "KWS"
    threads = {1: "one thread", 2: "two threads"}.get(st.get("threads", 1), f"{st.get('threads')} threads")
    out = [f"| {model} train step (batch {st['batch']}, {threads}) | median step | peak RSS | RSS after the steps |", "|---|---|---|---|"]
    out += [f"| {r['config']} | {1000 * r['step_s']:.1f} ms | {r['peak_rss_mb']:.0f} MB | {r['end_rss_mb']:.0f} MB |"
            for r in payload["rows"]]
    return "\n".join(out)


if __name__ == "__main__":
    main()
