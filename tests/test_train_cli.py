"""`edgepeft train` and `edgepeft eval` as a user meets them: progress, summary, and bad input refused intact."""

from __future__ import annotations

import math
import re
import shutil

import pytest

from cli_helpers import error_lines, run_cli
from edgepeft.delta import delta_from_init, save_delta
from edgepeft.delta.format import replace_meta
from synthetic_tasks import classification_files, pattern_lines, write_jsonl, write_lines

FAST = ["--max-steps", "6", "--batch-size", "16", "--lr", "3e-2", "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def bert(bundles):
    return bundles("bert")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    train, val = classification_files(tmp_path_factory.mktemp("cls"), n_val=60)
    return train, val


@pytest.fixture
def earlier(bert, files, tmp_path, capsys):
    """An earlier successful run in its own folder: its -o delta and checkpoint directory, and their bytes."""
    run = tmp_path / "run"
    out, ckpt = run / "out.delta", run / "ckpt"
    r = run_cli(capsys, "train", bert.path, "--data", files[0], "-o", out, "--checkpoint-dir", ckpt, *FAST)
    assert r.code == 0, r.err
    return out, ckpt, snapshot(run)


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (temporary files included) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused_intact(r, earlier, *words):
    out, _, before = earlier
    assert r.code == 1
    lines = error_lines(r)
    assert len(lines) == 1, r.err
    assert lines[0].startswith("Error:") and all(w in lines[0] for w in words), lines[0]
    assert snapshot(out.parent) == before, "the earlier delta or checkpoint changed, or a temporary file was left"


def train_again(capsys, bundle, data, earlier, *more):
    """The earlier run's command again (resuming its checkpoint), with something bad in it."""
    out, ckpt, _ = earlier
    return run_cli(capsys, "train", bundle, "--data", data, "-o", out, "--checkpoint-dir", ckpt, "--resume", *FAST, *more)


def test_train_shows_progress_and_a_summary_that_eval_confirms(bert, files, tmp_path, capsys):
    train, val = files
    out = tmp_path / "mine.delta"
    r = run_cli(capsys, "train", bert.path, "--data", train, "--val", val, "-o", out,
                "--epochs", "2", "--batch-size", "16", "--lr", "3e-2")
    assert r.code == 0, r.err
    progress = [l for l in r.err.splitlines() if l.startswith("step ") and "validation" not in l]
    assert len(progress) >= 5 and progress[-1].startswith("step 150/150")
    assert all(re.search(r"loss \d+\.\d{4} .* [\d.]+ steps/s  left \d+:\d\d", l) for l in progress), progress
    before = float(re.search(r"validation before: accuracy ([\d.]+) %", r.out).group(1))
    after = float(re.search(r"validation after:  accuracy ([\d.]+) %", r.out).group(1))
    assert re.search(r"trained 150 steps \(2400 examples seen\) in [\d.]+ s", r.out), r.out
    assert re.search(r"peak memory \d+ MB", r.out) and f"wrote {out}" in r.out
    assert before < 50 and after >= 80
    # eval reads the same numbers back: the base alone is "before" (a fresh delta is the base), the delta "after"
    base = run_cli(capsys, "eval", bert.path, "--data", val)
    mine = run_cli(capsys, "eval", bert.path, "--data", val, "--delta", out)
    assert base.code == mine.code == 0
    assert f"{100 * metric(base.out, 'accuracy'):.1f}" == f"{before:.1f}"
    assert f"{100 * metric(mine.out, 'accuracy'):.1f}" == f"{after:.1f}"
    assert metric(mine.out, "examples") == 60


def metric(out: str, name: str) -> float:
    return float(re.search(rf"^{name}\s+(\S+)$", out, re.M).group(1))


def test_eval_of_a_language_model_prints_loss_and_perplexity(bundles, tmp_path, capsys):
    b = bundles("llama")
    data = write_lines(tmp_path / "val.txt", pattern_lines(20, 3))
    r = run_cli(capsys, "eval", b.path, "--data", data)
    assert r.code == 0, r.err
    assert metric(r.out, "perplexity") == pytest.approx(math.exp(metric(r.out, "loss")), rel=1e-4)
    assert "accuracy" not in r.out


def test_empty_data_is_refused(bert, earlier, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    r = train_again(capsys, bert.path, tmp_path / "empty.jsonl", earlier)
    assert_refused_intact(r, earlier, "empty.jsonl", "no examples")


def test_a_label_the_bundle_does_not_know_is_refused(bert, earlier, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "w1 w2", "label": "LABEL_0"}, {"text": "w3", "label": "spam"}])
    r = train_again(capsys, bert.path, data, earlier)
    assert_refused_intact(r, earlier, "bad.jsonl:2", "unknown label 'spam'", "LABEL_0")


def test_a_delta_for_another_base_is_refused(bert, files, earlier, tmp_path, capsys):
    other = tmp_path / "other.delta"
    save_delta(other, replace_meta(delta_from_init(bert.manifest, 0), base_fingerprint="0" * 64))
    r = train_again(capsys, bert.path, files[0], earlier, "--delta", other)
    assert_refused_intact(r, earlier, "other.delta")
    assert "base" in error_lines(r)[0]


@pytest.mark.parametrize("graph", ["train", "infer"])
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_bundle_with_a_missing_or_corrupt_graph_is_refused(bert, files, earlier, tmp_path, capsys, graph, damage):
    broken = tmp_path / "bundle"
    shutil.copytree(bert.path, broken)
    path = broken / bert.manifest.graphs[graph].file
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    r = train_again(capsys, broken, files[0], earlier, "--val", files[1])
    assert_refused_intact(r, earlier, path.name, "missing" if damage == "missing" else "cannot be loaded")


def test_a_budget_too_small_for_batch_size_one_is_refused(bert, files, earlier, capsys):
    r = train_again(capsys, bert.path, files[0], earlier, "--memory-budget", "20")
    assert_refused_intact(r, earlier, "memory budget 20 MB is too small", "batch size 1 needs about")
    need = int(re.search(r"use --memory-budget (\d+)", error_lines(r)[0]).group(1))
    assert need > 20


def test_resume_without_a_checkpoint_dir_is_a_usage_error(bert, files, tmp_path, capsys):
    r = run_cli(capsys, "train", bert.path, "--data", files[0], "-o", tmp_path / "o.delta", "--resume")
    assert r.code == 2 and "--resume needs --checkpoint-dir" in r.err and not (tmp_path / "o.delta").exists()
