"""Generation: model.onnx's KV cache gives the logits of a cache-less run, and the sampling loop picks HF's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_reference
from conftest import random_delta
from edgepeft.errors import GenerationError
from edgepeft.names import ATTENTION_MASK, INPUT_IDS, LOGITS
from edgepeft.runtime.generate import Generator, Sampling, choose
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.kv_cache import empty_cache, next_cache


def prompt_ids(n: int = 7, seed: int = 0) -> list[int]:
    return [2, *np.random.default_rng(seed).integers(6, 96, n - 1).tolist()]  # <s> and words


def test_logits_with_the_cache_equal_logits_without_it(bundles):
    p = Predictor(bundles("llama"))
    delta = random_delta(p.manifest)
    ids = np.asarray([prompt_ids(10)], np.int64)
    slots = p.slot_feeds([delta])
    full = p.session.run([LOGITS], {INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids), **empty_cache(p.cache, 1), **slots})[0]
    outputs = [LOGITS, *(c.present for c in p.cache)]
    cache, steps = empty_cache(p.cache, 1), []
    for chunk in (ids[:, :6], ids[:, 6:7], ids[:, 7:8], ids[:, 8:]):  # a prefill, then token by token
        out = dict(zip(outputs, p.session.run(outputs, {INPUT_IDS: chunk, ATTENTION_MASK: np.ones_like(chunk), **cache, **slots})))
        cache = next_cache(p.cache, out)
        steps.append(out[LOGITS])
    assert np.abs(np.concatenate(steps, 1) - full).max() < 1e-5
    assert cache[p.cache[0].past].shape[2] == 10


def test_the_cache_is_used(bundles):
    # the same last token without its past gives other logits: the cache carries the context
    p = Predictor(bundles("llama"))
    ids = np.asarray([prompt_ids(8)], np.int64)
    with_past = p.logits(ids, np.ones_like(ids))[0, -1]
    alone = p.logits(ids[:, -1:], np.ones((1, 1), np.int64))[0, -1]
    assert np.abs(with_past - alone).max() > 1e-3


@pytest.mark.parametrize("with_delta", [False, True], ids=["base", "lora"])
def test_greedy_generation_gives_the_tokens_of_hf_generate(with_delta, model_dirs, bundles):
    bundle = bundles("llama")
    delta = random_delta(bundle.manifest, magnitude=0.3)
    ref = torch_reference.load_hf(model_dirs("llama"), bundle)
    if with_delta:
        ref, _ = torch_reference.with_deltas(ref, bundle, delta.tensors)
    ids = prompt_ids(6)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    gen = Generator(Predictor(bundle))
    gen.eos = None  # HF was told not to stop either
    ours = list(gen.tokens(ids, Sampling(max_new_tokens=12), [delta] if with_delta else []))
    assert ours == theirs


def test_cached_greedy_tokens_equal_recomputing_the_whole_sequence_each_step(bundles):
    p = Predictor(bundles("llama"))
    gen = Generator(p)
    gen.eos = None
    cached = list(gen.tokens(prompt_ids(5), Sampling(max_new_tokens=8)))
    ids = prompt_ids(5)
    for _ in range(8):  # what a bundle without a cache does: the whole sequence every step
        x = np.asarray([ids], np.int64)
        ids.append(int(p.logits(x, np.ones_like(x))[0, -1].argmax()))
    assert cached == ids[5:]


def test_gpt2_bundle_generates_without_a_cache(bundles):
    p = Predictor(bundles("gpt2"))
    assert p.cache == []
    assert len(list(Generator(p).tokens([5, 6, 7], Sampling(max_new_tokens=4)))) <= 4


def test_the_same_seed_samples_the_same_text_and_another_seed_may_not(bundles):
    gen = Generator(Predictor(bundles("llama")))
    s = dict(max_new_tokens=10, temperature=1.5)
    a = list(gen.tokens(prompt_ids(), Sampling(seed=1, **s)))
    b = list(gen.tokens(prompt_ids(), Sampling(seed=1, **s)))
    others = [list(gen.tokens(prompt_ids(), Sampling(seed=k, **s))) for k in range(2, 6)]
    assert a == b and any(o != a for o in others)


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32)
    best = int(logits.argmax())
    assert all(choose(logits, Sampling(temperature=2.0, top_k=1), rng) == best for _ in range(20))
    assert all(choose(logits, Sampling(temperature=2.0, top_p=1e-6), rng) == best for _ in range(20))


def test_top_k_samples_only_among_the_k_most_likely():
    rng = np.random.default_rng(0)
    logits = np.arange(20, dtype=np.float32)
    picks = {choose(logits, Sampling(temperature=5.0, top_k=3), rng) for _ in range(200)}
    assert picks == {17, 18, 19}


def test_top_p_keeps_the_smallest_set_reaching_p():
    rng = np.random.default_rng(0)
    logits = np.log(np.asarray([0.5, 0.3, 0.15, 0.05], np.float32))
    picks = {choose(logits, Sampling(temperature=1.0, top_p=0.7), rng) for _ in range(300)}
    assert picks == {0, 1}


def test_streamed_pieces_join_to_the_text_and_a_stop_string_ends_it_unprinted(bundles):
    gen = Generator(Predictor(bundles("llama")))
    gen.eos = None
    full = "".join(gen.stream(prompt_ids(), Sampling(max_new_tokens=10)))
    words = full.split()
    assert len(words) >= 4
    stop = " ".join(words[2:4])
    pieces = list(gen.stream(prompt_ids(), Sampling(max_new_tokens=10, stop=(stop,))))
    assert len(pieces) > 1
    assert "".join(pieces) == full[: full.index(stop)]


@pytest.mark.parametrize("options, name", [
    (dict(temperature=-1.0), "--temperature"), (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p"),
    (dict(top_k=-2), "--top-k"), (dict(max_new_tokens=0), "--max-new-tokens"), (dict(stop=("",)), "--stop"),
])
def test_generation_options_out_of_range_are_refused_by_name(options, name):
    with pytest.raises(GenerationError, match=name):
        Sampling(**options)


def test_a_classification_bundle_does_not_generate(bundles):
    with pytest.raises(GenerationError, match="does not generate"):
        Generator(Predictor(bundles("bert")))
