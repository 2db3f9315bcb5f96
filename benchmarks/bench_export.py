"""Export time and peak memory of all-MiniLM-L6-v2 for each weight format, beside a plain ONNX export.

The reference is what a user without edgepeft runs: ``torch.onnx.export`` of the inference model only
(no training step, fp32). Each export runs in its own process so peak RSS is its own.

    python benchmarks/bench_export.py            # writes benchmarks/results/export.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD_EDGEPEFT = """
import sys
from edgepeft.demo.assets import minilm_dir
from edgepeft.exporters.export import export_bundle
export_bundle(minilm_dir(), sys.argv[1], quantize=sys.argv[2], method="lora+bitfit", labels=["rotten", "fresh"], max_length=128)
"""

CHILD_PLAIN = """
import sys, os, torch, transformers
os.environ["HF_HUB_OFFLINE"] = "1"
from edgepeft.demo.assets import minilm_dir
m = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
ids = torch.ones(2, 16, dtype=torch.long)
b, t = torch.export.Dim("batch"), torch.export.Dim("seq")
torch.onnx.export(m, (ids, ids), sys.argv[1] + ".onnx", dynamo=True, input_names=["input_ids", "attention_mask"],
                  dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}), verify=False)
"""


PEAK = "\nimport resource; print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"


def run_child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh Python; return wall seconds and that process's own peak RSS in MB."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code + PEAK, *args], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    peak_kb = int(p.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="none,int8,int4", help="comma-separated weight formats to export")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        r = run_child(CHILD_PLAIN, f"{tmp}/plain")
        r.update(name="torch.onnx.export, inference only (fp32)", size_mb=round(sum(p.stat().st_size for p in Path(tmp).glob("plain*")) / 2**20, 1))  # .onnx + .onnx.data
        rows.append(r)
        for fmt in args.formats.split(","):
            out = Path(tmp) / f"bundle-{fmt}"
            r = run_child(CHILD_EDGEPEFT, str(out), fmt)
            size = sum(p.stat().st_size for p in out.iterdir())
            r.update(name=f"edgepeft export --quantize {fmt} (inference + train step)", size_mb=round(size / 2**20, 1))
            rows.append(r)
    base = rows[0]
    for r in rows:
        r["time_ratio_vs_plain"] = round(r["seconds"] / base["seconds"], 2)
    result = {"benchmark": "export all-MiniLM-L6-v2", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip(),
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'export':<58} {'time s':>7} {'× plain':>8} {'peak MB':>8} {'size MB':>8}")
    for r in rows:
        print(f"{r['name']:<58} {r['seconds']:>7} {r['time_ratio_vs_plain']:>8} {r['peak_rss_mb']:>8} {r['size_mb']:>8}")


if __name__ == "__main__":
    main()
