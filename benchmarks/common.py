"""What every benchmark shares: cached MiniLM bundles, child processes that report their own memory, the machine."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"
# What `edgepeft export --labels rotten,fresh` + `edgepeft train` give a user who passes no other options
# (--top-layers auto is the top 2 of all-MiniLM-L6-v2's 6 layers).
DEFAULT_BUNDLE = {"quantize": "int8", "method": "lora", "top_layers": 2}
FP32_PEAK_GFLOPS = 157.0  # this machine: 2 cores × 2.45 GHz × 2 FMA × 8 fp32 lanes × 2 (shared/notes)

# Appended to every child: its own peak and current RSS, read by run_child.
MEMORY_PROBE = """
import json as _j
def _status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) / 1024
# VmHWM, not ru_maxrss: ru_maxrss starts from the parent's RSS at fork, which would floor every child's peak
import resource as _r
_u = _r.getrusage(_r.RUSAGE_SELF)  # the whole process's CPU time, user + system (beside wall times taken under load)
print('MEMORY', _j.dumps({'peak_rss_mb': _status('VmHWM'), 'rss_mb': _status('VmRSS'), 'cpu_s': _u.ru_utime + _u.ru_stime}))
"""


def exporter_version() -> str:
    """A short hash of the exporter's source: a cached bundle made by other exporter code is stale."""
    import hashlib

    src = ROOT.parent
    h = hashlib.sha256()
    for f in sorted([*(src / "exporters").rglob("*.py"), src / "edgepeft" / "manifest.py", src / "edgepeft" / "names.py"]):
        if f.is_file():
            h.update(f.relative_to(src).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:8]


def results_version() -> str:
    """A short hash of every source a timed run's result depends on (exporters, runtime, edgepeft, the benchmarks'
    shared children): a cached result made by other code is stale, however unchanged the exporter is."""
    import hashlib

    src = ROOT.parent
    h = hashlib.sha256()
    files = [*(src / "exporters").rglob("*.py"), *(src / "runtime").rglob("*.py"), *(src / "edgepeft").rglob("*.py"),
             *(ROOT / n for n in ("common.py", "cnn_children.py"))]
    for f in sorted(files):
        if f.is_file():
            h.update(f.relative_to(src).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:8]


def minilm_bundle(quantize: str = "int8", method: str = "lora+bitfit", *, top_layers: int | None = None,
                  max_length: int = 128, rank: int | None = 8, method_config: dict | None = None) -> Path:
    """Path of an exported all-MiniLM-L6-v2 bundle (rotten/fresh head), exported once per exporter version
    into benchmarks/.cache (older exports of the same configuration are removed). ``rank=None``: each method's own default."""
    import shutil

    name = f"minilm-{quantize}-{method.replace('+', '_')}{f'-r{rank}' if rank else ''}-L{max_length}" + (f"-top{top_layers}" if top_layers else "")
    if method_config:  # options beyond the defaults: a name per set of them
        import hashlib

        name += "-o" + hashlib.sha256(json.dumps(method_config, sort_keys=True).encode()).hexdigest()[:6]
    out = CACHE / f"{name}-x{exporter_version()}"
    for stale in CACHE.glob(f"{name}*"):
        if stale != out and re.fullmatch(re.escape(name) + r"(-x[0-9a-f]{8})?", stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    if not (out / "manifest.json").is_file():
        from edgepeft.demo.assets import minilm_dir
        from edgepeft.exporters.export import export_bundle

        print(f"exporting {name} (once; cached in {CACHE})", file=sys.stderr, flush=True)
        export_bundle(minilm_dir(), out, quantize=quantize, method=method, labels=["rotten", "fresh"],
                      max_length=max_length, rank=rank, top_layers=top_layers, method_config=method_config or {})
    return out


# A child's wall-clock limit: 30 minutes is several times a quiet run of the slowest child, but torch children
# passed it at load 15+; EDGEPEFT_BENCH_CHILD_TIMEOUT (seconds) raises it for runs on a shared machine.
CHILD_TIMEOUT_S = float(os.environ.get("EDGEPEFT_BENCH_CHILD_TIMEOUT", 1800))


def run_child(code: str, *args: str, env: dict | None = None, timeout: float | None = None, stream_stderr: bool = False) -> dict:
    """Run ``code`` in a fresh interpreter; return the JSON it printed on RESULT lines plus its memory.

    ``stream_stderr`` passes the child's stderr (progress lines) through instead of keeping it for errors.
    """
    p = subprocess.run([sys.executable, "-c", code + MEMORY_PROBE, *args], stdout=subprocess.PIPE,
                       stderr=None if stream_stderr else subprocess.PIPE, text=True, timeout=timeout or CHILD_TIMEOUT_S,
                       env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(f"child failed (exit {p.returncode}):\n{(p.stderr or '(stderr above)')[-3000:]}")
    out: dict = {}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            out.update(json.loads(line[7:]))
        elif line.startswith("MEMORY "):
            out.update(json.loads(line[7:]))
    return out


def alternate(configs: dict[str, tuple[str, list[str]]], rounds: int, say=lambda name, res: "") -> dict[str, list[dict]]:
    """Run every (code, argv) configuration once per round, each in its own process, order reversed every other round."""
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    for r in range(rounds):
        for name in (list(configs) if r % 2 == 0 else list(reversed(configs))):
            code, argv = configs[name]
            res = run_child(code, *argv)
            runs[name].append(res)
            print(f"round {r + 1}: {name}: {say(name, res)}", file=sys.stderr, flush=True)
    return runs


def machine() -> str:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu or platform.processor()} ({os.cpu_count()} cores), {platform.system()} {platform.machine()}"


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def result_name(name: str) -> str:
    """A results file's stem: a plain name, so a run writes inside benchmarks/results/ and nowhere else (also an
    argparse ``type`` for a bench's ``--out``)."""
    import argparse

    if not name or name != Path(name).name or name.startswith(".") or name.endswith(".json"):
        raise argparse.ArgumentTypeError(f"{name!r}: give a plain name such as fleet_prox (written as results/NAME.json)")
    return name


def write_result(name: str, payload: dict) -> Path:
    """Write benchmarks/results/<name>.json with date and machine."""
    result_name(name)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
