"""The exported graphs compute what torch + PEFT computes on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

import torch_reference
from conftest import random_delta
from edgepeft.names import ATTENTION_MASK, INPUT_IDS, LABELS, LOSS, SEQ_CLS, grad_name
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.kv_cache import cache_specs, empty_cache
from edgepeft.runtime.lm_targets import loss_chunks, train_feeds


def batch(bundle, b: int, t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, bundle.manifest.vocab_size, size=(b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    mask[0, t - 2:] = 0  # one padded row
    labels = rng.integers(0, max(1, len(bundle.manifest.labels)), size=(b,)).astype(np.int64)
    return ids, mask, labels


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def masked(x: np.ndarray, mask: np.ndarray, task: str) -> np.ndarray:
    return x if task == SEQ_CLS else x[mask.astype(bool)]  # padded LM positions are not compared


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "llama", "gpt2"])
def test_inference_graph_matches_torch_peft_with_random_deltas(kind, model_dirs, bundles):
    bundle = bundles(kind)
    delta = random_delta(bundle.manifest)
    ids, mask, _ = batch(bundle, 3, 9)
    ours = Predictor(bundle).logits(ids, mask, [delta])
    ref, _ = torch_reference.with_deltas(torch_reference.load_hf(model_dirs(kind), bundle), bundle, delta.tensors)
    theirs = torch_reference.logits(ref, ids, mask)
    t = bundle.manifest.task
    assert np.abs(masked(ours, mask, t) - masked(theirs, mask, t)).max() < 1e-4


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_no_delta_gives_the_base_model_outputs(kind, model_dirs, bundles):
    bundle = bundles(kind)
    ids, mask, _ = batch(bundle, 2, 7)
    ours = Predictor(bundle).logits(ids, mask)
    base = torch_reference.logits(torch_reference.load_hf(model_dirs(kind), bundle), ids, mask)
    t = bundle.manifest.task
    assert np.abs(masked(ours, mask, t) - masked(base, mask, t)).max() < 1e-5


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_plain_onnxruntime_runs_the_inference_graph_with_only_the_batch_fed(kind, model_dirs, bundles):
    import onnxruntime as ort

    bundle = bundles(kind)
    ids, mask, _ = batch(bundle, 2, 7)
    sess = ort.InferenceSession(str(bundle.graph_path("infer")), providers=["CPUExecutionProvider"])
    cache = empty_cache(cache_specs(sess), len(ids))  # a causal LM's KV cache: empty = no cache (P = 0)
    assert {i.name for i in sess.get_inputs()} == {INPUT_IDS, ATTENTION_MASK, *cache}  # every slot has a neutral default
    ours = sess.run(None, {INPUT_IDS: ids, ATTENTION_MASK: mask, **cache})[0]
    base = torch_reference.logits(torch_reference.load_hf(model_dirs(kind), bundle), ids, mask)
    t = bundle.manifest.task
    assert np.abs(masked(ours, mask, t) - masked(base, mask, t)).max() < 1e-5


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_int8_inference_matches_torch_on_the_dequantized_weights(kind, model_dirs, bundles):
    bundle = bundles(kind, "int8")
    delta = random_delta(bundle.manifest)
    ids, mask, _ = batch(bundle, 2, 8)
    ours = Predictor(bundle).logits(ids, mask, [delta])
    ref, _ = torch_reference.with_deltas(torch_reference.load_hf(model_dirs(kind), bundle), bundle, delta.tensors)
    t = bundle.manifest.task
    assert np.abs(masked(ours, mask, t) - masked(torch_reference.logits(ref, ids, mask), mask, t)).max() < 1e-4


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_int8_logits_stay_within_stated_tolerance_of_fp32(kind, bundles):
    # Stated tolerance: int8 per-channel weights move logits by at most 5 % of their range on these models.
    fp32, int8 = bundles(kind), bundles(kind, "int8")
    delta = random_delta(fp32.manifest)
    ids, mask, _ = batch(fp32, 4, 10)
    a = Predictor(fp32).logits(ids, mask, [delta])
    b = Predictor(int8).logits(ids, mask, [delta])
    t = fp32.manifest.task
    assert rel(masked(b, mask, t), masked(a, mask, t)) < 0.05


@pytest.mark.parametrize("top_layers", [None, 1], ids=["every-layer", "top-1"])  # top-1: the backward stops early
@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_train_step_gives_torch_autograd_loss_and_gradients(kind, quantize, top_layers, model_dirs, bundles):
    bundle = bundles(kind, quantize, top_layers=top_layers)
    m = bundle.manifest
    delta = random_delta(m, seed=3)
    sess = bundle.session("train")
    ref, params = torch_reference.with_deltas(torch_reference.load_hf(model_dirs(kind), bundle), bundle, delta.tensors)
    for b, t in [(2, 6), (5, 13)]:  # two batch sizes, two lengths, one bundle
        ids, mask, labels = batch(bundle, b, t, seed=b)
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask, **delta.tensors}
        if m.task == SEQ_CLS:
            feeds[LABELS] = labels
        else:  # the graph scores the positions the runtime hands it: here every real token, as HF's loss does
            feeds.update(train_feeds(feeds, loss_chunks(sess)))
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        loss, grads = torch_reference.loss_and_grads(ref, params, m.task, ids, mask, labels)
        assert abs(float(outs[LOSS]) - loss) <= 1e-4 * abs(loss)
        for s in m.slots:
            assert rel(outs[grad_name(s.name)], grads[s.name]) < 1e-4, s.name
