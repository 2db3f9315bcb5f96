"""`--memory-budget` keeps a real run's peak under the budget, where the same run without it goes over."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from edgepeft.delta import load_delta
from synthetic_tasks import classification_files


def vm_hwm_mb(pid: int) -> float:
    """The process's own peak RSS so far (VmHWM), 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:")), 0.0)
    except OSError:
        return 0.0


def train(bundle, data, out, *options) -> tuple[float, float, str]:
    """Run `edgepeft train` in a fresh process: (peak MB its summary states, peak MB seen from outside, summary)."""
    argv = [sys.executable, "-m", "edgepeft.cli", "train", str(bundle), "--data", str(data), "-o", str(out),
            "--max-steps", "2", "--lr", "1e-2", "-q", *map(str, options)]
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        p = subprocess.Popen(argv, stdout=so, stderr=se, text=True)
        seen = 0.0
        while p.poll() is None:  # VmHWM only falls when the probe resets it, so polling sees every later peak
            seen = max(seen, vm_hwm_mb(p.pid))
            time.sleep(0.002)
        so.seek(0), se.seek(0)
        stdout, stderr = so.read(), se.read()
    assert p.returncode == 0, stderr[-2000:]
    said = float(re.search(r"peak memory (\d+) MB", stdout).group(1))
    return said, seen, stdout


def test_a_budgeted_run_peaks_under_the_budget_and_learns_the_same_delta(bundles, tmp_path):
    b = bundles("bert")
    data, _ = classification_files(tmp_path, n_val=10)  # 1,200 rows: batch 1,200 is one big train-graph run
    small, _, _ = train(b.path, data, tmp_path / "small.delta", "--batch-size", "1")
    big, big_seen, _ = train(b.path, data, tmp_path / "big.delta", "--batch-size", "1200")
    assert big - small > 50, "the whole-data batch must need clearly more memory than batch 1 for this test to mean anything"
    budget = small + (big - small) / 4  # between: only micro-batches of the big batch fit
    said, seen, summary = train(b.path, data, tmp_path / "budget.delta", "--batch-size", "1200", "--memory-budget", f"{budget:.0f}")
    assert big > budget and big_seen > budget
    assert said < budget and seen < budget, summary
    micro = int(re.search(r"micro-batch (\d+)", summary).group(1))
    assert 1 <= micro < 1200, summary
    # the budget changes how the batch is computed, not what is learned
    whole, parts = load_delta(tmp_path / "big.delta"), load_delta(tmp_path / "budget.delta")
    for k in whole.tensors:
        np.testing.assert_allclose(parts.tensors[k], whole.tensors[k], rtol=1e-3, atol=1e-5, err_msg=k)
