"""Which onnxruntime session settings a CNN train step runs best under: weights dequantized at load or per step,
one intra-op thread or two, spinning threads or sleeping ones.

Each setting runs in a fresh process (``bench_cnn_profile``'s child: the train graph cut to the loss and the trained
gradients, random inputs of the bundle's shape), rounds alternating between settings so that a change in the
machine's load hits them alike (and between bundles: two exports of one model compare as A/B); per bundle and
setting the median over rounds of the median step's wall and CPU seconds, and the process's peak RSS.
runtime/bundle.SessionConfig's CNN defaults are chosen from this.

    python benchmarks/bench_cnn_session.py BUNDLE [BUNDLE ...] [--batch 32] [--steps 10] [--rounds 3] [--setting NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_cnn_profile import CHILD  # noqa: E402
from common import run_child, write_result  # noqa: E402

SETTINGS = {  # name: (dequantize_at_load, threads, spinning, memory pattern: None = the graph's default[, optimization level])
    "int8 weights, 1 thread": (False, 1, True, None),
    "dequantized at load, 1 thread": (True, 1, True, None),
    # onnxruntime's graph optimizations short of layout ones: no NCHWc convolutions, so no Reorder operators either
    "dequantized at load, 1 thread, optimization extended": (True, 1, True, None, "extended"),
    "dequantized at load, 1 thread, memory pattern": (True, 1, True, True),
    "dequantized at load, 2 threads": (True, 2, True, None),
    "dequantized at load, 2 threads, no spinning": (True, 2, False, None),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--setting", action="append", choices=list(SETTINGS), help="Run only this setting (repeatable; all by default).")
    ap.add_argument("--out", default="cnn_session")
    a = ap.parse_args(argv)
    settings = {k: SETTINGS[k] for k in a.setting or SETTINGS}
    load, rows = [round(os.getloadavg()[0], 1)], []
    runs: dict[tuple[Path, str], list[dict]] = {(p, k): [] for p in a.bundles for k in settings}
    for _ in range(a.rounds):
        for path in a.bundles:
            for name, (deq, threads, spin, pattern, *level) in settings.items():
                args = {"batch": a.batch, "threads": threads, "steps": a.steps, "profile": False, "dequantize": deq, "spin": spin,
                        "pattern": pattern, "optimization": level[0] if level else "all"}
                runs[path, name].append(run_child(CHILD, str(path), json.dumps(args)))
    for path in a.bundles:
        for name in settings:
            rs = runs[path, name]
            row = {"bundle": path.name, "setting": name,
                   **{k: round(statistics.median(r[k] for r in rs), 4) for k in ("wall_step_s", "cpu_step_s")},
                   "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rs), 1)}
            rows.append(row)
            print(f"{path.name}: {name}: {1000 * row['wall_step_s']:.1f} ms wall, {1000 * row['cpu_step_s']:.1f} ms CPU a step, "
                  f"{row['peak_rss_mb']:.0f} MB", flush=True)
    load.append(round(os.getloadavg()[0], 1))
    print(f"wrote {write_result(a.out, {'settings': vars(a) | {'bundles': [p.name for p in a.bundles]}, 'load_average_1min': load, 'rows': rows})}")


if __name__ == "__main__":
    main()
