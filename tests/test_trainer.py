"""The training loop on tiny bundles: it learns, keeps the best delta, resumes exactly, fits a memory budget."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from edgepeft.delta import delta_from_init
from edgepeft.delta.format import replace_meta
from edgepeft.errors import TrainError
from edgepeft.names import AUDIO_CLS, IMAGE_CLS, SEQ_CLS
from edgepeft.runtime import memory
from edgepeft.runtime.data import load_dataset
from edgepeft.runtime.evaluate import evaluate
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.text import load_tokenizer
from edgepeft.runtime.trainer import TrainConfig, Trainer
from synthetic_tasks import classification_files, pattern_lines, word_group_rows, write_jsonl, write_lines


@pytest.fixture(scope="module")
def bert(bundles, tmp_path_factory):
    """(bundle, train, val) for the word-group task."""
    b = bundles("bert")
    train, val = classification_files(tmp_path_factory.mktemp("cls"))
    tok = load_tokenizer(b)
    return b, load_dataset(train, b.manifest, tok), load_dataset(val, b.manifest, tok)


@pytest.fixture(scope="module")
def llama(bundles, tmp_path_factory):
    b = bundles("llama")
    root = tmp_path_factory.mktemp("lm")
    tok = load_tokenizer(b)
    return (b, load_dataset(write_lines(root / "train.txt", pattern_lines(400, 1)), b.manifest, tok),
            load_dataset(write_lines(root / "val.txt", pattern_lines(50, 2)), b.manifest, tok))


@pytest.fixture(scope="module")
def confident_llama(model_dirs, tmp_path_factory):
    """(bundle, train, val) of the tiny llama with its output head scaled x15.

    A 0.02-init head bounds |logits| below ~0.7, so no delta can make a confident prediction; a
    pretrained head can, and scaling gives this random one the same freedom (logits up to ~10).
    """
    import torch
    import transformers as tf

    from edgepeft.exporters.export import export_bundle
    from edgepeft.runtime.bundle import open_bundle

    root = tmp_path_factory.mktemp("confident")
    model = tf.AutoModelForCausalLM.from_pretrained(model_dirs("llama"))
    with torch.no_grad():
        model.lm_head.weight.mul_(15.0)
    model.save_pretrained(root / "model")
    tf.AutoTokenizer.from_pretrained(model_dirs("llama")).save_pretrained(root / "model")
    export_bundle(root / "model", root / "bundle", quantize="none", method="lora", rank=4, alpha=8)
    b = open_bundle(root / "bundle")
    tok = load_tokenizer(b)
    return (b, load_dataset(write_lines(root / "train.txt", pattern_lines(400, 1)), b.manifest, tok),
            load_dataset(write_lines(root / "val.txt", pattern_lines(50, 2)), b.manifest, tok))


def test_tiny_bert_learns_which_word_group_dominates(bert):
    b, train, val = bert
    r = Trainer(b, train, TrainConfig(epochs=4, lr=3e-2), val=val).fit()
    assert r.summary.before["accuracy"] < 0.5
    assert r.summary.after["accuracy"] >= 0.9


def test_tiny_llama_learns_a_repeating_pattern(llama):
    b, train, val = llama
    r = Trainer(b, train, TrainConfig(epochs=10, lr=3e-2), val=val).fit()
    # the random tiny lm_head bounds |logits| below ~0.7, so ~3.9 nats is the floor for any delta: the drop
    # from ~4.5 is most of what is reachable, and greedy decoding shows the rule itself was learned
    assert r.summary.after["loss"] < r.summary.before["loss"] - 0.4
    p = Predictor(b)
    assert p.generate("w2 w3", max_new_tokens=6, deltas=[r.delta]) == "w4 w5 w1 w2 w3 w4"
    assert p.generate("w2 w3", max_new_tokens=6) != "w4 w5 w1 w2 w3 w4"


def test_a_tiny_llm_learns_a_synthetic_language_far_below_its_starting_loss(confident_llama):
    b, train, val = confident_llama
    r = Trainer(b, train, TrainConfig(epochs=10, lr=3e-2), val=val).fit()
    before, after = r.summary.before, r.summary.after
    assert after["loss"] < 0.3 * before["loss"]
    # the language's own entropy: only the first word after <s> is uncertain (1 of 5), so perplexity nears 1
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"])) and after["perplexity"] < 2.0
    assert evaluate(Predictor(b), val, [r.delta]) == pytest.approx(after)
    assert Predictor(b).generate("w4", max_new_tokens=7, deltas=[r.delta]) == "w5 w1 w2 w3 w4 w5 w1"


def test_output_meta_counts_examples_seen_and_names_its_parent(bert):
    b, train, _ = bert
    start = replace_meta(delta_from_init(b.manifest, 3), adapter="kbd", version=7)
    r = Trainer(b, train, TrainConfig(max_steps=5, batch_size=8, creator="dev-1"), start=start).fit()
    m = r.delta.meta
    assert (m.samples, m.parent, m.adapter, m.creator, m.base_fingerprint) == (40, 7, "kbd", "dev-1", b.manifest.fingerprint)
    fresh = Trainer(b, train, TrainConfig(max_steps=2, batch_size=8)).fit().delta.meta
    assert (fresh.parent, fresh.adapter, fresh.samples) == (None, "default", 16)


def test_early_stopping_returns_the_best_evaluated_delta(bert, tmp_path):
    b, train, _ = bert
    rows = word_group_rows(60, 9)
    for i, r in enumerate(rows):
        r["label"] = i % 3  # labels unrelated to the text: accuracy wanders, so patience runs out
    noise = load_dataset(write_jsonl(tmp_path / "noise.jsonl", rows), b.manifest, load_tokenizer(b))
    seen = []
    r = Trainer(b, train, TrainConfig(epochs=5, lr=3e-2, eval_every=5, patience=2), val=noise,
                on_progress=lambda p: p.metrics and seen.append(p.metrics["accuracy"])).fit()
    s = r.summary
    assert s.stopped_early and s.steps < s.total_steps
    assert s.after["accuracy"] == max(seen)
    assert evaluate(Predictor(b), noise, [r.delta])["accuracy"] == pytest.approx(s.after["accuracy"])


def test_a_run_that_never_beats_its_start_returns_the_start_with_no_samples(bert):
    b, train, val = bert
    start = replace_meta(delta_from_init(b.manifest, 3), adapter="kbd", version=7)
    r = Trainer(b, train, TrainConfig(max_steps=4, batch_size=8, lr=1e-12), val=val, start=start).fit()
    assert r.summary.best_step == 0 and r.delta.meta.samples == 0  # steps of 1e-12 change no prediction
    assert r.summary.after == r.summary.before
    for k, v in start.tensors.items():
        np.testing.assert_array_equal(r.delta.tensors[k], v)


@pytest.mark.parametrize("split", [{"micro_batch": 3}, {"data_parallel": 2}, {"data_parallel": 2, "micro_batch": 3}],
                         ids=["micro-batches", "data-parallel", "data-parallel-micro-batches"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_micro_batches_give_the_gradient_of_the_whole_batch(kind, split, bert, llama):
    # classification weighs micro-batches by examples, a causal LM by real target tokens; run at once or in turn
    b, train, _ = bert if kind == "bert" else llama
    cfg = dict(max_steps=6, batch_size=10, lr=1e-2)
    whole = Trainer(b, train, TrainConfig(**cfg)).fit().delta
    parts = Trainer(b, train, TrainConfig(**cfg, **split)).fit().delta
    for k in whole.tensors:
        np.testing.assert_allclose(parts.tensors[k], whole.tensors[k], rtol=1e-3, atol=1e-5, err_msg=k)


class Meeting:
    """A train session whose runs wait for each other: two that do not overlap in time break the barrier."""

    def __init__(self, session, parties: int) -> None:
        self.session, self.barrier = session, threading.Barrier(parties, timeout=20)

    def run(self, outputs, feeds):
        self.barrier.wait()
        return self.session.run(outputs, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_data_parallel_runs_its_micro_batches_at_the_same_time(bert):
    b, train, _ = bert

    class Met(Trainer):
        def _sessions(self):
            super()._sessions()
            self.session = Meeting(self.session, 2)

    r = Met(b, train, TrainConfig(max_steps=2, batch_size=8, data_parallel=2)).fit()
    assert r.summary.steps == 2


def test_data_parallel_shares_the_threads_among_its_runs(bert):
    b, train, _ = bert
    assert Trainer(b, train, TrainConfig(threads=4, data_parallel=2))._run_threads() == 2
    assert Trainer(b, train, TrainConfig(threads=1, data_parallel=2))._run_threads() == 1
    assert Trainer(b, train, TrainConfig(threads=0))._run_threads() == 0  # onnxruntime's own default


def test_a_negative_data_parallel_is_refused():
    with pytest.raises(TrainError, match="data-parallel must not be negative"):
        TrainConfig(data_parallel=-1)


def test_data_parallel_by_default_runs_a_cnn_batch_one_micro_batch_per_thread_and_text_whole():
    assert TrainConfig(threads=2, batch_size=32).parallel_runs(IMAGE_CLS) == 2
    assert TrainConfig(threads=4, batch_size=16).parallel_runs(AUDIO_CLS) == 2  # micro-batches of 8 or more
    assert TrainConfig(threads=4, batch_size=4).parallel_runs(IMAGE_CLS) == 1
    assert TrainConfig(threads=4, batch_size=64).parallel_runs(SEQ_CLS) == 1
    assert TrainConfig(threads=4, batch_size=64, data_parallel=3).parallel_runs(SEQ_CLS) == 3  # as asked


class Crash(Exception):
    pass


def test_resume_after_a_crash_ends_with_the_same_delta(bert, tmp_path):
    b, train, val = bert
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2, checkpoint_every=7, eval_every=10, patience=5)
    straight = Trainer(b, train, cfg, val=val).fit()

    def crash_at_step_30(p):
        if p.step == 30 and p.metrics is None:
            raise Crash()

    with pytest.raises(Crash):  # last checkpoint at step 28, mid-epoch, after an evaluation
        Trainer(b, train, cfg, val=val, checkpoint_dir=tmp_path, on_progress=crash_at_step_30).fit()
    resumed = Trainer(b, train, cfg, val=val, checkpoint_dir=tmp_path).fit(resume=True)
    assert resumed.summary.resumed_at == 28
    for k in straight.delta.tensors:
        assert np.array_equal(resumed.delta.tensors[k], straight.delta.tensors[k]), k
    assert resumed.summary.after == straight.summary.after and resumed.delta.meta.samples == straight.delta.meta.samples


def test_resume_with_other_options_is_refused(bert, tmp_path):
    b, train, _ = bert
    Trainer(b, train, TrainConfig(max_steps=3), checkpoint_dir=tmp_path).fit()
    with pytest.raises(TrainError, match="lr=0.002, this run asks 0.001"):
        Trainer(b, train, TrainConfig(max_steps=3, lr=1e-3), checkpoint_dir=tmp_path).fit(resume=True)
    with pytest.raises(TrainError, match="pass --resume"):
        Trainer(b, train, TrainConfig(max_steps=3), checkpoint_dir=tmp_path).fit()


# ---- the memory plan, on a synthetic measurement: fixed 100 MB + 0.01 MB per example-token ----

def linear_probe(b: int, t: int) -> float:
    return 100.0 + 0.01 * b * t


def test_memory_plan_picks_the_largest_micro_batch_that_fits():
    p = memory.plan_memory(120, batch_size=64, longest=100, measure=linear_probe)
    assert p.micro_batch == int((120 * memory.HEADROOM - 100) / (0.01 * 100)) and p.max_length == 100
    assert not p.session.arena  # twice the activations would not fit
    assert p.max_tokens == p.micro_batch * 100  # shorter batches may run more examples in the same tokens


def test_memory_plan_turns_the_arena_on_when_there_is_room():
    p = memory.plan_memory(1000, batch_size=16, longest=100, measure=linear_probe)
    assert (p.micro_batch, p.session.arena, p.max_tokens) == (16, True, 0)


def test_memory_plan_measures_growth_when_the_fixed_part_alone_is_near_the_budget():
    # the allocator's slack makes batch 1 peak above batch 2 (measured: 159 vs 150 MB on MiniLM's every-layer graph);
    # the probes must go on until they see the activations grow, not plan the whole batch as if they cost nothing
    def slack_probe(b: int, t: int) -> float:
        return 150.0 + (10.0 if b == 1 else 0.0) + 0.135 * b * t

    p = memory.plan_memory(200, batch_size=16, longest=65, measure=slack_probe)
    assert p.micro_batch < 16 and slack_probe(p.micro_batch, p.max_length) <= 200 * memory.HEADROOM
    assert p.estimate_mb >= slack_probe(p.micro_batch, p.max_length)  # the estimate errs high, not low


def test_memory_plan_shortens_sequences_only_when_batch_one_does_not_fit():
    p = memory.plan_memory(100.5 / memory.HEADROOM, batch_size=16, longest=128, measure=linear_probe)
    assert p.micro_batch >= 1 and p.max_length < 128 and 100 + 0.01 * p.max_length <= 100.5 + 1e-9


def test_memory_budget_below_batch_one_names_the_measured_minimum():
    with pytest.raises(TrainError) as e:
        memory.plan_memory(50, batch_size=16, longest=128, measure=linear_probe)
    need = (100 + 0.01 * memory.MIN_LENGTH) / memory.HEADROOM  # batch 1 at the shortest length it may truncate to
    assert f"batch size 1 needs about {need:.0f} MB" in str(e.value) and "\n" not in str(e.value)


def test_a_budgeted_run_probes_the_train_graph_then_trains(bert):
    b, train, _ = bert
    r = Trainer(b, train, TrainConfig(max_steps=2, memory_budget_mb=memory.rss_mb() + 2000)).fit()
    assert r.summary.memory.micro_batch == 16 and r.summary.memory.fixed_mb > 0 and r.summary.steps == 2


def test_a_budgeted_data_parallel_run_plans_for_its_runs_at_once(bert):
    b, train, _ = bert
    probed = []

    class Counted(Trainer):
        def _run_all(self, feeds, outputs=None):
            probed.append(len(feeds))
            return super()._run_all(feeds, outputs)

    r = Counted(b, train, TrainConfig(max_steps=2, data_parallel=2, memory_budget_mb=memory.rss_mb() + 2000)).fit()
    assert r.summary.memory.micro_batch == 8 and r.summary.steps == 2  # half of the batch of 16 per run
    assert set(probed) == {2}  # every probe and every step ran two micro-batches at once
