"""A real `edgepeft train` killed with SIGKILL mid-run and resumed ends with the uninterrupted run's delta."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from cli_helpers import run_cli
from edgepeft.delta import load_delta
from edgepeft.runtime.checkpoint import checkpoint_path, load_checkpoint
from synthetic_tasks import classification_files

OPTIONS = ["--epochs", "2", "--batch-size", "16", "--lr", "1e-2", "--seed", "7", "--checkpoint-every", "10",
           "--eval-every", "25", "--patience", "9"]


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_delta(bundles, tmp_path, capsys):
    b = bundles("bert")
    train, val = classification_files(tmp_path / "data", n_val=60)  # 1,200 rows: 75 steps an epoch
    common = [b.path, "--data", train, "--val", val, *OPTIONS]
    straight = run_cli(capsys, "train", *common, "-o", tmp_path / "straight.delta")
    assert straight.code == 0, straight.err

    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.delta"
    argv = [sys.executable, "-m", "edgepeft.cli", "train", *map(str, common), "-o", str(out), "--checkpoint-dir", str(ckpt)]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not checkpoint_path(ckpt).is_file():  # kill as soon as the first checkpoint lands, inside a later step
        assert p.poll() is None, "the run ended before its first checkpoint: " + p.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(30) == -signal.SIGKILL
    _, state = load_checkpoint(ckpt)
    assert not state["done"] and 0 < state["step"] < 150
    assert not out.exists()

    resumed = run_cli(capsys, "train", *common, "-o", out, "--checkpoint-dir", ckpt, "--resume")
    assert resumed.code == 0, resumed.err
    assert f"(resumed at step {state['step']})" in resumed.out
    a, z = load_delta(tmp_path / "straight.delta"), load_delta(out)
    assert a.tensors.keys() == z.tensors.keys()
    for k in a.tensors:
        assert np.array_equal(a.tensors[k], z.tensors[k]), k
    assert (a.meta.samples, a.meta.extra) == (z.meta.samples, z.meta.extra)
