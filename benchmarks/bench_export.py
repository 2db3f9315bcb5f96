"""Export time and peak memory of all-MiniLM-L6-v2 (the workstation step), beside a plain ONNX export.

The reference is what a user without edgepeft runs: ``torch.onnx.export`` of the inference model only
(no training step, fp32). edgepeft exports the inference graph and the train step, with the weights
stored once; by default only the default export (``--formats int8``; all three with
``--formats none,int8,int4``). Each export runs in its own process so peak RSS is its own.

    python benchmarks/bench_export.py [--formats int8]      # writes benchmarks/results/export.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import DEFAULT_BUNDLE, run_child, write_result  # noqa: E402

CHILD_EDGEPEFT = """
import json, sys
from edgepeft.demo.assets import minilm_dir
from edgepeft.exporters.export import export_bundle
export_bundle(minilm_dir(), sys.argv[1], labels=["rotten", "fresh"], max_length=128, **json.loads(sys.argv[2]))
"""

CHILD_PLAIN = """
import sys, os, torch, transformers
os.environ["HF_HUB_OFFLINE"] = "1"
from edgepeft.demo.assets import minilm_dir
transformers.logging.set_verbosity_error()
m = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
ids = torch.ones(2, 16, dtype=torch.long)
b, t = torch.export.Dim("batch"), torch.export.Dim("seq")
torch.onnx.export(m, (ids, ids), sys.argv[1] + ".onnx", dynamo=True, input_names=["input_ids", "attention_mask"],
                  dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}), verify=False)
"""


def timed(code: str, *args: str) -> dict:
    t0 = time.perf_counter()
    res = run_child(code, *args)
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(res["peak_rss_mb"], 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int8", help="comma-separated weight formats to export (none,int8,int4)")
    ap.add_argument("--quick", action="store_true", help="the plain export and the default export only")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        r = timed(CHILD_PLAIN, f"{tmp}/plain")
        size = sum(p.stat().st_size for p in Path(tmp).glob("plain*"))  # plain.onnx + plain.onnx.data
        rows.append({"config": "torch.onnx.export, inference only (fp32)", **r, "size_mb": round(size / 2**20, 1)})
        for fmt in args.formats.split(","):
            options = {**DEFAULT_BUNDLE, "quantize": fmt}
            out = Path(tmp) / f"bundle-{fmt}"
            r = timed(CHILD_EDGEPEFT, str(out), json.dumps(options))
            size = sum(p.stat().st_size for p in out.iterdir())
            flags = f"--quantize {fmt} --method {options['method']}" + (f" --top-layers {options['top_layers']}" if options["top_layers"] else "")
            rows.append({"config": f"edgepeft export {flags} (inference + train step)", **r, "size_mb": round(size / 2**20, 1)})
    for r in rows:
        r["time_ratio_vs_plain"] = round(r["seconds"] / rows[0]["seconds"], 2)
        r["peak_ratio_vs_plain"] = round(r["peak_rss_mb"] / rows[0]["peak_rss_mb"], 2)
    write_result("export", {"benchmark": "export all-MiniLM-L6-v2", "rows": rows})
    print(f"{'export':<70} {'time s':>7} {'× plain':>8} {'peak MB':>8} {'size MB':>8}")
    for r in rows:
        print(f"{r['config']:<70} {r['seconds']:>7} {r['time_ratio_vs_plain']:>8} {r['peak_rss_mb']:>8} {r['size_mb']:>8}")


if __name__ == "__main__":
    main()
