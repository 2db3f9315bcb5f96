"""Footprint of the device install against torch + transformers + peft: bytes installed and memory after import.

Two fresh virtual environments under benchmarks/.cache (built once, rebuilt when pyproject.toml or
constraints.txt change): ``pip install .`` (edgepeft, no extras: what a device gets) and
``pip install -c constraints.txt torch transformers peft`` (what training with PEFT needs; torch is
the CPU wheel). Installed size is every file under site-packages minus what an empty venv already
has (pip). Memory after import: the RSS of a fresh process in each venv that imports what training
needs, median of ``--rounds`` processes, alternating.

    python benchmarks/bench_footprint.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, ROOT, median, write_result  # noqa: E402

REPO = ROOT.parent
ENVS = {
    "edgepeft device install (pip install .)": ("device", ["."],
                                                "import onnxruntime, edgepeft.runtime.trainer, edgepeft.runtime.infer"),
    "torch + transformers + peft": ("torch", ["-c", "constraints.txt", "torch", "transformers", "peft"],
                                    "import torch, transformers, peft; from transformers import AutoModelForSequenceClassification; "
                                    "from peft import get_peft_model"),
}
RSS = "; import os; print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20)"


def _digest(args: list[str], sources: bool) -> str:
    h = hashlib.sha256(json.dumps(args).encode())
    for f in ("pyproject.toml", "constraints.txt"):
        h.update((REPO / f).read_bytes())
    if sources:  # the device install copies the package: reinstall it when its sources change
        for d in ("edgepeft", "runtime", "devices", "exporters"):
            for p in sorted((REPO / d).rglob("*.py")):
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def ensure_venv(name: str, args: list[str]) -> Path:
    """benchmarks/.cache/venv-<name> with ``pip install <args>`` done (once; edgepeft alone re-installed on change)."""
    path = CACHE / f"venv-{name}"
    pip = [str(path / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    stamp, sources = path / ".stamp", path / ".sources"
    want, want_src = _digest(args, False), _digest(args, args == ["."])
    if not (stamp.is_file() and stamp.read_text() == want):
        print(f"building {path} (pip install {' '.join(args)}; cached afterwards)", file=sys.stderr, flush=True)
        if path.exists():
            shutil.rmtree(path)
        venv.EnvBuilder(with_pip=True, clear=True).create(path)
        (path / ".baseline.json").write_text(json.dumps(sorted(p.name for p in site_packages(path).iterdir())))
        subprocess.run([*pip, *args], cwd=REPO, check=True)
        stamp.write_text(want)
        sources.write_text(want_src)
    elif not (sources.is_file() and sources.read_text() == want_src):
        subprocess.run([*pip, "--no-deps", "--force-reinstall", *args], cwd=REPO, check=True)
        sources.write_text(want_src)
    return path


def site_packages(env: Path) -> Path:
    return next(env.glob("lib/python*/site-packages"))


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def installed_bytes(env: Path) -> tuple[int, list[str]]:
    """Bytes under site-packages except what an empty venv has (pip, setuptools); and the distributions installed."""
    sp = site_packages(env)
    base = env / ".baseline.json"
    empty = set(json.loads(base.read_text())) if base.is_file() else set()
    total, dists = 0, []
    for p in sp.iterdir():
        if p.name in empty or p.name.startswith(("pip", "setuptools", "pkg_resources", "_distutils_hack", "distutils-precedence")):
            continue
        if p.name.endswith(".dist-info"):
            dists.append(p.name[:-10])
        total += tree_bytes(p) if p.is_dir() else p.stat().st_size
    return total, sorted(dists)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="fresh import processes per environment")
    ap.add_argument("--quick", action="store_true", help="one import round")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    envs = {name: ensure_venv(key, pip_args) for name, (key, pip_args, _) in ENVS.items()}
    rss: dict[str, list[float]] = {k: [] for k in ENVS}
    for r in range(rounds):
        for name in (list(ENVS) if r % 2 == 0 else list(reversed(ENVS))):
            code = ENVS[name][2] + RSS
            out = subprocess.run([str(envs[name] / "bin" / "python"), "-c", code], capture_output=True, text=True,
                                 check=True, cwd="/", env={**os.environ, "HF_HUB_OFFLINE": "1"})
            rss[name].append(float(out.stdout.split()[-1]))
    rows = []
    for name, env in envs.items():
        size, dists = installed_bytes(env)
        rows.append({"config": name, "installed_mb": round(size / 2**20, 1), "distributions": len(dists),
                     "rss_after_import_mb": round(median(rss[name]), 1), "import": ENVS[name][2], "dists": dists})
    base = rows[1]
    for r in rows:
        r["installed_ratio_vs_torch"] = round(r["installed_mb"] / base["installed_mb"], 3)
        r["rss_ratio_vs_torch"] = round(r["rss_after_import_mb"] / base["rss_after_import_mb"], 3)
    write_result("footprint", {"benchmark": "device install footprint vs torch + transformers + peft", "rows": rows, "raw": rss})
    for r in rows:
        print(f"{r['config']:<42} {r['installed_mb']:>8} MB installed ({r['installed_ratio_vs_torch']}×), "
              f"{r['distributions']} distributions, RSS after import {r['rss_after_import_mb']} MB ({r['rss_ratio_vs_torch']}×)")


if __name__ == "__main__":
    main()
