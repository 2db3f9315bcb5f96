"""`edgepeft train --select auto`: a gradient probe picks the modules that fit a delta byte budget; the rest stay neutral."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import error_lines, run_cli
from edgepeft.errors import TrainError
from edgepeft.manifest import Slot
from edgepeft.names import ATTENTION_MASK, INPUT_IDS, LABELS, grad_name
from edgepeft.delta import delta_from_init, load_delta
from edgepeft.runtime.data import load_dataset
from edgepeft.runtime.select import choose, layer_of
from edgepeft.runtime.text import load_tokenizer
from edgepeft.runtime.trainer import TrainConfig, Trainer
from synthetic_tasks import classification_files


def slot(module: str, kind: str, shape: tuple[int, ...]) -> Slot:
    return Slot(f"{module}.{kind}", kind, module, shape)


SLOTS = [slot("enc.layer.0.q", "bias", (10,)), slot("enc.layer.1.q", "bias", (10,)), slot("enc.layer.1.v", "bias", (25,)),
         slot("classifier", "bias", (2,))]


def test_layer_of_reads_the_layer_index_of_a_module_path():
    assert layer_of("bert.encoder.layer.3.attention.self.query") == 3
    assert layer_of("model.layers.12.self_attn.q_proj") == 12
    assert layer_of("classifier") is None


def test_the_best_scoring_modules_that_fit_the_bytes_are_chosen_with_the_head_always():
    scores = {"enc.layer.0.q": 1.0, "enc.layer.1.q": 3.0, "enc.layer.1.v": 5.0}
    sel = choose(SLOTS, scores, max_bytes=8 + 100 + 40, probe_steps=4)  # head 8 B, v 100 B, then q of layer 1 (40 B)
    assert sel.modules == ("enc.layer.1.v", "enc.layer.1.q") and sel.always == ("classifier",)
    assert sel.delta_bytes == 148 and sel.layers == [1]
    # a module that does not fit is skipped, a smaller one below it still goes in
    assert choose(SLOTS, scores, max_bytes=8 + 40 + 40, probe_steps=4).modules == ("enc.layer.1.q", "enc.layer.0.q")


def test_a_byte_budget_no_module_fits_is_refused_in_one_line_naming_the_option():
    with pytest.raises(TrainError, match="--max-delta-bytes 40: no module fits") as e:
        choose(SLOTS, {}, max_bytes=40, probe_steps=4)
    assert "at least 48" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def bert(bundles):
    return bundles("bert")


@pytest.fixture(scope="module")
def data(bert, tmp_path_factory):
    train, _ = classification_files(tmp_path_factory.mktemp("sel"), n_train=64, n_val=10)
    return train, load_dataset(train, bert.manifest, load_tokenizer(bert))


def layered_bytes(manifest) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in manifest.slots:
        out[s.module] = out.get(s.module, 0) + 4 * int(np.prod(s.shape))
    return out


def test_the_trainer_trains_the_modules_the_probe_ranks_highest_and_holds_the_rest_neutral(bert, data):
    m = bert.manifest
    size = layered_bytes(m)
    head = sum(v for k, v in size.items() if layer_of(k) is None)
    # the probe's own measurement, by hand: squared gradients of the starting delta on the probe's batches
    budget = head + max(v for k, v in size.items() if layer_of(k) is not None)
    config = TrainConfig(max_steps=3, batch_size=16, lr=1e-2, checkpoint_every=0, select="auto", max_delta_bytes=budget)
    result = Trainer(bert, data[1], config).fit()
    chosen = json.loads(result.delta.meta.extra["select"])
    assert chosen["delta_bytes"] <= budget and chosen["modules"]
    sess, start = bert.session("train"), delta_from_init(m, 0)
    from edgepeft.runtime.data import plan_batches
    from edgepeft.runtime.select import PROBE_STEPS

    scores: dict[str, float] = {}
    for idx in plan_batches(data[1].lengths, 16, np.random.default_rng(1))[:PROBE_STEPS]:
        b = data[1].batch(idx, m.max_length)
        grads = sess.run([grad_name(s.name) for s in m.slots], {**b, **start.tensors})
        for s, g in zip(m.slots, grads):
            scores[s.module] = scores.get(s.module, 0.0) + float(np.square(g, dtype=np.float64).sum())
    best = max((k for k in scores if layer_of(k) is not None), key=scores.get)
    assert chosen["modules"][0] == best
    for s in m.slots:
        t = result.delta.tensors[s.name]
        if s.module in chosen["modules"] or layer_of(s.module) is None:
            continue
        assert not np.any(t), s.name  # held at the neutral value (LoRA and BitFit: zeros)
    assert any(np.any(result.delta.tensors[s.name]) for s in m.slots if s.module == best)


def test_select_auto_prints_its_choice_and_a_budget_nothing_fits_writes_nothing(bert, data, tmp_path, capsys):
    out = tmp_path / "run" / "out.delta"
    r = run_cli(capsys, "train", bert.path, "--data", data[0], "-o", out, "--max-steps", "2", "--select", "auto",
                "--max-delta-bytes", "16")
    assert r.code == 1
    (line,) = error_lines(r)
    assert "--max-delta-bytes 16" in line, line
    assert not out.exists()
    r = run_cli(capsys, "train", bert.path, "--data", data[0], "-o", out, "--max-steps", "2", "--select", "auto",
                "--max-delta-bytes", "100000")
    assert r.code == 0, r.err
    assert "--select auto:" in r.out and "deepest" in r.out
    assert "select" in load_delta(out, bert.manifest).meta.extra


def test_a_train_graph_cut_to_the_top_gradients_computes_them_exactly_with_fewer_nodes(bert):
    import onnx

    from edgepeft.names import LOSS
    from edgepeft.onnx_prune import prune_outputs

    m = bert.manifest
    top = max(layer_of(s.module) for s in m.slots if layer_of(s.module) is not None)
    keep = [LOSS] + [grad_name(s.name) for s in m.slots if layer_of(s.module) in (top, None)]
    full, cut = bert.session("train"), bert.session("train", outputs=keep)
    assert [o.name for o in cut.get_outputs()] == keep
    rng = np.random.default_rng(0)
    d = delta_from_init(m, 0)
    feeds = {INPUT_IDS: rng.integers(4, m.vocab_size, (3, 9)), ATTENTION_MASK: np.ones((3, 9), np.int64),
             LABELS: np.array([0, 1, 0]), **{k: v + np.float32(0.01) for k, v in d.tensors.items()}}
    for a, b in zip(full.run(keep, feeds), cut.run(keep, feeds)):
        assert np.array_equal(a, b)
    graph = bert.graph_path("train").read_bytes()
    nodes = len(onnx.load_from_string(graph).graph.node)
    assert len(onnx.load_from_string(prune_outputs(graph, set(keep))).graph.node) < nodes  # the lower backward is gone


def test_a_selected_run_trains_on_the_cut_graph(bert, data):
    size = layered_bytes(bert.manifest)
    budget = sum(v for k, v in size.items() if layer_of(k) is None) + max(v for k, v in size.items() if layer_of(k) is not None)
    config = TrainConfig(max_steps=1, batch_size=16, checkpoint_every=0, select="auto", max_delta_bytes=budget)
    t = Trainer(bert, data[1], config)
    t.fit()
    trained = [s for s in bert.manifest.slots if t.selection.trains(s)]
    assert len(t.session.get_outputs()) == 1 + len(trained) < 1 + len(bert.manifest.slots)
