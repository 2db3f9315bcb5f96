"""`edgepeft export`, `info` and `infer` as a user meets them: clear errors, nothing half-written."""

from __future__ import annotations

import json

import pytest

from cli_helpers import error_lines, run_cli
from edgepeft.cli import COMMANDS


def assert_refused(r, out_dir, *words):
    assert r.code != 0
    lines = error_lines(r)
    assert len(lines) == 1, r.err
    for w in words:
        assert w in lines[0], lines[0]
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.*")), "a partial build was left behind"


def test_missing_model_directory_is_refused(tmp_path, capsys):
    r = run_cli(capsys, "export", tmp_path / "nope", "-o", tmp_path / "b")
    assert_refused(r, tmp_path / "b", "no such model directory")


def test_unsupported_architecture_is_refused(tmp_path, capsys):
    d = tmp_path / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    r = run_cli(capsys, "export", d, "-o", tmp_path / "b")
    assert_refused(r, tmp_path / "b", "unsupported architecture 't5'", "bert")


def test_targets_that_match_nothing_are_refused(model_dirs, tmp_path, capsys):
    r = run_cli(capsys, "export", model_dirs("bert"), "-o", tmp_path / "b", "--targets", "q_proj")
    assert_refused(r, tmp_path / "b", "'q_proj' matches no linear module")


@pytest.mark.parametrize("rank", ["0", "-3"])
def test_non_positive_rank_is_refused(model_dirs, tmp_path, capsys, rank):
    r = run_cli(capsys, "export", model_dirs("bert"), "-o", tmp_path / "b", "--rank", rank)
    assert r.code == 2 and "--rank" in r.err and not (tmp_path / "b").exists()


def test_a_task_the_model_cannot_do_is_refused(model_dirs, tmp_path, capsys):
    r = run_cli(capsys, "export", model_dirs("bert"), "-o", tmp_path / "b", "--task", "causal-lm")
    assert_refused(r, tmp_path / "b", "cannot be exported for causal-lm")


def test_existing_output_directory_is_refused_and_left_alone(model_dirs, tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    r = run_cli(capsys, "export", model_dirs("bert"), "-o", out)
    assert r.code == 1 and "already exists" in error_lines(r)[0]
    assert (out / "mine.txt").read_text() == "keep me"


def test_a_failure_during_export_leaves_no_partial_bundle(model_dirs, tmp_path, monkeypatch):
    from edgepeft.exporters import export as export_mod
    import onnx

    from edgepeft.exporters import trace, weights

    def boom(*a, **k):
        raise RuntimeError("disk full")

    # no tracing (the exporter imports these from their modules when it runs): the failure is in the writing
    monkeypatch.setattr(trace, "export_graphs", lambda *a, **k: {"infer": onnx.ModelProto(), "train": onnx.ModelProto()})
    monkeypatch.setattr(weights, "add_input_defaults", lambda *a, **k: None)
    monkeypatch.setattr(weights, "save_bundle_graphs", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_mod.export_bundle(model_dirs("bert"), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    r = run_cli(capsys, command, "--help")
    assert r.code == 0 and "Usage:" in r.out


def test_info_shows_base_fingerprint_size_and_slots(bundles, capsys):
    b = bundles("bert", "int8")
    r = run_cli(capsys, "info", b.path)
    assert r.code == 0
    for word in (b.manifest.fingerprint, "int8", "size on disk", "% of", "lora_A", "classifier.weight"):
        assert word in r.out


def test_infer_prints_a_label_with_probabilities(bundles, capsys):
    b = bundles("bert")
    r = run_cli(capsys, "infer", b.path, "w1 w2 w3", "w4")
    lines = r.out.strip().splitlines()
    assert r.code == 0 and len(lines) == 2
    assert lines[0].split("\t")[0] in b.manifest.labels and "=" in lines[0]


def test_infer_continues_text_for_a_causal_lm(bundles, capsys):
    b = bundles("llama")
    r = run_cli(capsys, "infer", b.path, "w1 w2", "--max-new-tokens", "3")
    assert r.code == 0 and r.out.startswith("w1 w2")


def test_infer_refuses_a_delta_for_another_base(bundles, tmp_path, capsys):
    from edgepeft.delta import delta_from_init, save_delta

    other = bundles("bert", "int8")
    save_delta(tmp_path / "x.delta", delta_from_init(other.manifest, seed=0))
    r = run_cli(capsys, "infer", bundles("bert").path, "--delta", tmp_path / "x.delta", "w1")
    assert r.code == 1 and len(error_lines(r)) == 1 and "x.delta" in r.err


def test_top_layers_puts_slots_only_in_the_last_layers(bundles):
    m = bundles("bert", top_layers=1).manifest
    assert m.train_layers == (1,)
    layer_slots = [s.module for s in m.slots if ".layer." in s.module]
    assert layer_slots and all(".layer.1." in name for name in layer_slots)
    assert bundles("bert").manifest.train_layers is None  # auto on a 2-layer model: every layer


@pytest.mark.parametrize("value, words", [("0", "(1 or more)"), ("3", "the model has 2 layers"),
                                          ("x", "expected a number of layers")])
def test_top_layers_outside_the_model_are_refused(model_dirs, tmp_path, capsys, value, words):
    r = run_cli(capsys, "export", model_dirs("bert"), "-o", tmp_path / "b", "--top-layers", value)
    assert r.code != 0 and words in r.err and not (tmp_path / "b").exists()


def test_auto_top_layers_is_the_top_third_and_at_least_two():
    from edgepeft.exporters.inject import auto_top_layers

    assert [auto_top_layers(n) for n in (1, 2, 3, 6, 12, 32)] == [1, 2, 2, 2, 4, 11]
