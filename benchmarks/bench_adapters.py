"""Many adapters on one MiniLM int8 base: per-call cost of an active LoRA, switching, memory for 1/10/100 adapters.

Every number comes from a fresh child process. Calls with and without the adapter alternate one by
one in the same process (so drift and neighbours' load hit both alike); figures are medians. The
ONNX Runtime column feeds the same delta through onnxruntime's own ``LoraAdapter`` +
``RunOptions.add_active_adapter`` for comparison, on the bundle's own ``model.onnx`` (its slot inputs
have neutral defaults, which ORT adapters override); its overhead is against that graph run plain.

    python benchmarks/bench_adapters.py        # writes benchmarks/results/adapters.json, prints a table
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, alternate, median, minilm_bundle, run_child, write_result  # noqa: E402

SHAPES = [(1, 32), (8, 128)]  # (batch, tokens): one short sentence; a full batch at the bundle's max length
COUNTS = [1, 10, 100]

CHILD_SPEED = r"""
import json, sys, tempfile, time
import numpy as np, onnxruntime as ort
from edgepeft.delta import load_delta
from edgepeft.delta.ort_adapter import to_ort_adapter
from edgepeft.runtime.adapters import AdapterPool
from edgepeft.runtime.bundle import SessionConfig, open_bundle
bundle_dir, adir, calls, b, t = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
pool = AdapterPool(open_bundle(bundle_dir, verify=False), config=SessionConfig(threads=1))
for i in range(2):
    pool.add(f"a{i}", f"{adir}/a{i}.delta")
rng = np.random.default_rng(0)
ids = rng.integers(1000, 20000, size=(b, t)).astype(np.int64)
mask = np.ones_like(ids)
tmp = tempfile.mkdtemp()
to_ort_adapter(load_delta(f"{adir}/a0.delta"), f"{tmp}/a0.onnx_adapter")
lora = ort.LoraAdapter()
lora.Load(f"{tmp}/a0.onnx_adapter")
ro = ort.RunOptions()
ro.add_active_adapter(lora)
bundle = pool.predictor.bundle
so = ort.SessionOptions(); so.log_severity_level = 3; so.intra_op_num_threads = 1
# the bundle's own model.onnx: every slot input has a neutral default, which ORT adapters override
sess = ort.InferenceSession(str(bundle.path / "model.onnx"), so, providers=["CPUExecutionProvider"])
def ort_native():
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": mask}, ro)[0]
def ort_none():
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
def timed(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0
runs = {"none": lambda: pool.logits(ids, mask), "lora": lambda: pool.logits(ids, mask, "a0"),
        "ort_none": ort_none, "ort_adapter": ort_native, "switch": None}
assert np.abs(ort_native() - pool.logits(ids, mask, "a0")).max() < 1e-4
times = {k: [] for k in runs}
for _ in range(5):
    for k in ("none", "lora", "ort_none", "ort_adapter"):
        runs[k]()
prev = "a0"
for i in range(calls):
    order = ["none", "lora", "ort_none", "ort_adapter", "switch"]
    order = order[i % 5:] + order[:i % 5]
    for k in order:
        if k == "switch":  # the adapter of this call differs from the last call's
            nxt = "a1" if prev == "a0" else "a0"
            times[k].append(timed(lambda: pool.logits(ids, mask, nxt)))
            prev = nxt
        else:
            times[k].append(timed(runs[k]))
            prev = "a0" if k == "lora" else prev
loads = []
for i in range(2, 22):  # map + check + prepare a delta file not seen before (page cache warm)
    loads.append(timed(lambda: pool.add(f"a{i}", f"{adir}/a{i}.delta")))
print("RESULT " + json.dumps({"times_ms": {k: float(np.median(v)) * 1e3 for k, v in times.items()},
                              "load_ms": float(np.median(loads)) * 1e3}))
"""

CHILD_MEMORY = r"""
import json, sys
import numpy as np
from edgepeft.runtime.adapters import AdapterPool
from edgepeft.runtime.bundle import SessionConfig, open_bundle
bundle_dir, adir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
pool = AdapterPool(open_bundle(bundle_dir, verify=False), cap_bytes=1 << 31, config=SessionConfig(threads=1))
ids = np.full((1, 32), 2000, np.int64)
mask = np.ones_like(ids)
pool.logits(ids, mask)
for i in range(n):
    pool.add(f"a{i}", f"{adir}/a{i}.delta")
    pool.logits(ids, mask, f"a{i}")
status = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile"))}
print("RESULT " + json.dumps({"cached_bytes": pool.cached_bytes, "cached": len(pool.cached),
                              "anon_mb": status["RssAnon"], "file_mb": status["RssFile"]}))
"""


def make_adapters(bundle: Path, count: int) -> Path:
    """``count`` random trained-looking deltas for ``bundle`` (B and biases non-zero), written once."""
    import numpy as np

    from edgepeft.delta import Delta, delta_from_init, save_delta
    from edgepeft.manifest import read_manifest

    m = read_manifest(bundle)
    out = CACHE / f"adapters-{m.fingerprint[:12]}"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        p = out / f"a{i}.delta"
        if not p.is_file():
            d = delta_from_init(m, i, adapter=f"a{i}")
            rng = np.random.default_rng(i)
            t = {k: v if k.endswith("lora_A") else (rng.standard_normal(v.shape) * 0.02).astype(np.float32)
                 for k, v in d.tensors.items()}
            save_delta(p, Delta(t, d.meta))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=150, help="timed calls per mode and shape")
    ap.add_argument("--repeats", type=int, default=2, help="child processes per memory configuration")
    args = ap.parse_args()
    bundle = minilm_bundle("int8")
    adir = make_adapters(bundle, max(COUNTS))
    delta_bytes = (adir / "a0.delta").stat().st_size

    speed = []
    for b, t in SHAPES:
        calls = args.calls if b * t <= 64 else max(15, args.calls // 10)  # keep a full run to a few minutes
        r = run_child(CHILD_SPEED, str(bundle), str(adir), str(calls), str(b), str(t))
        ms = r["times_ms"]
        speed.append({"batch": b, "tokens": t, "calls": calls, **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
                      "lora_overhead_pct": round(100 * (ms["lora"] / ms["none"] - 1), 2),
                      "ort_adapter_overhead_pct": round(100 * (ms["ort_adapter"] / ms["ort_none"] - 1), 2),
                      "switch_extra_ms": round(ms["switch"] - ms["lora"], 3), "load_ms": round(r["load_ms"], 2)})

    runs = alternate({n: (CHILD_MEMORY, [str(bundle), str(adir), str(n)]) for n in [0, *COUNTS]}, args.repeats,
                     lambda n, res: f"{n} adapters, RSS {res['rss_mb']:.1f} MB")
    base_rss = median([r["rss_mb"] for r in runs[0]])
    base_anon = median([r["anon_mb"] for r in runs[0]])
    memory = []
    for n in COUNTS:
        rss = median([r["rss_mb"] for r in runs[n]])
        memory.append({"adapters": n, "rss_mb": round(rss, 1), "over_base_mb": round(rss - base_rss, 1),
                       "per_adapter_kb": round(1024 * (rss - base_rss) / n, 1),
                       "anon_over_base_mb": round(median([r["anon_mb"] for r in runs[n]]) - base_anon, 1),
                       "file_mb": round(median([r["file_mb"] for r in runs[n]]), 1),
                       "cached_bytes": runs[n][0]["cached_bytes"]})

    by_n = {m["adapters"]: m for m in memory}
    marginal = {"rss_kb_per_adapter_10_to_100": round(1024 * (by_n[100]["rss_mb"] - by_n[10]["rss_mb"]) / 90, 1),
                "anon_kb_per_adapter_10_to_100": round(1024 * (by_n[100]["anon_over_base_mb"] - by_n[10]["anon_over_base_mb"]) / 90, 1)}
    payload = {"bundle": bundle.name, "delta_file_bytes": delta_bytes, "threads": 1,
               "base_rss_mb": round(base_rss, 1), "speed": speed, "memory": memory, "marginal": marginal}
    path = write_result("adapters", payload)
    print(f"MiniLM int8 base, LoRA r8 on query/value + BitFit + head; delta file {delta_bytes} bytes; 1 onnxruntime thread")
    print(f"{'batch x tokens':>15} {'calls':>6} {'no delta':>10} {'1 LoRA':>10} {'overhead':>9} {'ORT adapter':>12} {'overhead':>9} "
          f"{'switch +':>9} {'load':>8}")
    for s in speed:
        print(f"{s['batch']:>7} x {s['tokens']:<5} {s['calls']:>6} {s['none_ms']:>8.2f}ms {s['lora_ms']:>8.2f}ms {s['lora_overhead_pct']:>8.1f}% "
              f"{s['ort_adapter_ms']:>10.2f}ms {s['ort_adapter_overhead_pct']:>8.1f}% {s['switch_extra_ms']:>7.2f}ms "
              f"{s['load_ms']:>6.2f}ms")
    print(f"\nRSS, base session alone: {base_rss:.1f} MB")
    print(f"{'adapters':>9} {'RSS':>9} {'over base':>10} {'per adapter':>12} {'of it anon':>11} {'cached feeds':>13}")
    for m in memory:
        print(f"{m['adapters']:>9} {m['rss_mb']:>7.1f}MB {m['over_base_mb']:>8.1f}MB {m['per_adapter_kb']:>9.1f}KB "
              f"{m['anon_over_base_mb']:>9.1f}MB {m['cached_bytes'] / 2**20:>11.2f}MB")
    print(f"each adapter past the 10th: {marginal['rss_kb_per_adapter_10_to_100']:.0f} KB RSS, "
          f"{marginal['anon_kb_per_adapter_10_to_100']:.0f} KB of it heap")
    print("(anon: heap, e.g. LoRA B times its scale; the rest is clean file-backed pages of the mapped deltas, which the kernel can drop)")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
