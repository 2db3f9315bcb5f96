"""What every benchmark shares: cached MiniLM bundles, child processes that report their own memory, the machine."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"
FP32_PEAK_GFLOPS = 157.0  # this machine: 2 cores × 2.45 GHz × 2 FMA × 8 fp32 lanes × 2 (shared/notes)

# Appended to every child: its own peak and current RSS, read by run_child.
MEMORY_PROBE = """
import resource as _r, json as _j
def _rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
print('MEMORY', _j.dumps({'peak_rss_mb': _r.getrusage(_r.RUSAGE_SELF).ru_maxrss / 1024, 'rss_mb': _rss()}))
"""


def minilm_bundle(quantize: str = "int8", method: str = "lora+bitfit", *, top_layers: int | None = None,
                  max_length: int = 128, rank: int = 8) -> Path:
    """Path of an exported all-MiniLM-L6-v2 bundle (rotten/fresh head), exporting it once into benchmarks/.cache."""
    name = f"minilm-{quantize}-{method.replace('+', '_')}-r{rank}-L{max_length}" + (f"-top{top_layers}" if top_layers else "")
    out = CACHE / name
    if not (out / "manifest.json").is_file():
        from edgepeft.demo.assets import minilm_dir
        from edgepeft.exporters.export import export_bundle

        print(f"exporting {name} (once; cached in {CACHE})", file=sys.stderr, flush=True)
        export_bundle(minilm_dir(), out, quantize=quantize, method=method, labels=["rotten", "fresh"],
                      max_length=max_length, rank=rank, top_layers=top_layers)
    return out


def run_child(code: str, *args: str, env: dict | None = None, timeout: float = 1800) -> dict:
    """Run ``code`` in a fresh interpreter; return the JSON it printed on a RESULT line plus its memory."""
    p = subprocess.run([sys.executable, "-c", code + MEMORY_PROBE, *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(f"child failed:\n{p.stderr[-3000:]}")
    out: dict = {}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            out.update(json.loads(line[7:]))
        elif line.startswith("MEMORY "):
            out.update(json.loads(line[7:]))
    return out


def machine() -> str:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu or platform.processor()} ({os.cpu_count()} cores), {platform.system()} {platform.machine()}"


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def write_result(name: str, payload: dict) -> Path:
    """Write benchmarks/results/<name>.json with date and machine."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
