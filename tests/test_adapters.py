"""Many adapters on one base: per-call choice and mixing against Predictor and torch, the LRU cache, one session."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch
import torch_reference

from edgepeft.delta import Delta, delta_from_init, save_delta
from edgepeft.delta.format import replace_meta
from edgepeft.errors import DeltaError
from edgepeft.names import BIAS, LORA_A, LORA_B, WEIGHT, split_slot_name
from edgepeft.runtime.adapters import AdapterError, AdapterPool
from edgepeft.runtime.feeds import prepare
from edgepeft.runtime.infer import Predictor


def make_delta(manifest, seed: int) -> Delta:
    """A delta that fits ``manifest`` with every slot non-zero (B too)."""
    d = delta_from_init(manifest, seed, adapter=f"a{seed}")
    rng = np.random.default_rng(seed + 100)
    return Delta({k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in d.tensors.items()}, d.meta)


@pytest.fixture(scope="module")
def bert(bundles, tmp_path_factory):
    """(bundle, {name: delta}, {name: path}) with five saved deltas a0..a4."""
    b = bundles("bert")
    root = tmp_path_factory.mktemp("adapters")
    deltas = {f"a{i}": make_delta(b.manifest, i) for i in range(5)}
    paths = {}
    for name, d in deltas.items():
        paths[name] = root / f"{name}.delta"
        save_delta(paths[name], d)
    return b, deltas, paths


@pytest.fixture(scope="module")
def entry_bytes(bert):
    b, deltas, _ = bert
    return prepare(b.manifest, deltas["a0"]).nbytes


def batch(manifest, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, manifest.vocab_size, size=(3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    return ids, mask


def pool_with(bert, names, **kw) -> AdapterPool:
    b, _, paths = bert
    pool = AdapterPool(b, **kw)
    for n in names:
        pool.add(n, paths[n])
    return pool


def test_one_adapter_gives_the_predictor_outputs_with_that_delta(bert):
    b, deltas, _ = bert
    pool = pool_with(bert, ["a0", "a1"])
    ids, mask = batch(b.manifest)
    ref = Predictor(b)
    for name in ("a0", "a1", "a0"):
        np.testing.assert_allclose(pool.logits(ids, mask, name), ref.logits(ids, mask, [deltas[name]]), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(pool.logits(ids, mask), ref.logits(ids, mask))


def test_mix_equals_torch_model_with_the_weighted_sum_of_updates(bert, model_dirs):
    """Mixing {a: 0.7, b: 0.3} is the base plus 0.7·ΔW_a + 0.3·ΔW_b (ΔW = s·B@A), bias and head deltas weighted alike."""
    b, deltas, _ = bert
    mix = {"a1": 0.7, "a2": 0.3}
    model = torch_reference.load_hf(model_dirs("bert"), b)
    total: dict[str, np.ndarray] = {}
    for name, w in mix.items():
        d = deltas[name]
        for m in d.lora_modules():
            total[f"{m}.weight"] = total.get(f"{m}.weight", 0) + w * d.delta_w(m)
        for slot, t in d.tensors.items():
            module, kind = split_slot_name(slot)
            if kind in (BIAS, WEIGHT):
                total[f"{module}.{kind}"] = total.get(f"{module}.{kind}", 0) + w * t.astype(np.float64)
    with torch.no_grad():
        for key, dw in total.items():
            module, _, p = key.rpartition(".")
            getattr(model.get_submodule(module), p).add_(torch.from_numpy(np.asarray(dw, np.float32)))
    ids, mask = batch(b.manifest, 1)
    theirs = torch_reference.logits(model, ids, mask)
    ours = pool_with(bert, list(mix)).logits(ids, mask, mix)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(ours - pool_with(bert, ["a1"]).logits(ids, mask, "a1")).max() > 1e-3  # the mix is not just a1


def test_switching_adapters_builds_no_session(bert, monkeypatch):
    import onnxruntime

    made = []
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: made.append(1) or real(*a, **k))
    pool = pool_with(bert, ["a0", "a1", "a2"], cap_bytes=1 << 30)
    session = pool.predictor.session
    ids, mask = batch(bert[0].manifest)
    for spec in ("a0", "a1", None, {"a0": 0.5, "a2": 0.5}, "a2", "a0"):
        pool.logits(ids, mask, spec)
    assert len(made) == 1 and pool.predictor.session is session


def test_adapters_are_memory_mapped_and_b_scaled_once(bert):
    b, deltas, _ = bert
    pool = pool_with(bert, ["a0"])
    entry = pool.resolve("a0")[0][0]
    a_slot = next(s.name for s in b.manifest.slots if s.kind == LORA_A)
    b_slot = next(s.name for s in b.manifest.slots if s.kind == LORA_B)
    base = entry.tensors[a_slot]
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(getattr(base, "obj", base), mmap.mmap) and not entry.tensors[a_slot].flags.writeable
    np.testing.assert_array_equal(entry.tensors[b_slot], deltas["a0"].tensors[b_slot] * np.float32(deltas["a0"].scale))
    assert pool.resolve("a0")[0][0] is entry  # the cache hands out the same feeds: no per-call work


def test_lru_evicts_the_least_recently_used(bert, entry_bytes):
    pool = pool_with(bert, ["a0", "a1"], cap_bytes=int(2.5 * entry_bytes))
    ids, mask = batch(bert[0].manifest)
    pool.logits(ids, mask, "a0")  # a1 is now the least recently used
    pool.add("a2", bert[2]["a2"])
    assert pool.cached == ["a0", "a2"] and pool.stats.evictions == 1
    loads = pool.stats.loads
    np.testing.assert_allclose(pool.logits(ids, mask, "a1"), Predictor(bert[0]).logits(ids, mask, [bert[1]["a1"]]), atol=1e-6)
    assert pool.stats.loads == loads + 1 and pool.cached == ["a2", "a1"]  # a1 came back, a0 went


def test_pinned_adapters_are_never_evicted_and_cap_is_respected(bert, entry_bytes):
    cap = int(2.5 * entry_bytes)
    pool = pool_with(bert, ["a0"], cap_bytes=cap)
    pool.pin("a0")
    ids, mask = batch(bert[0].manifest)
    for name in ("a1", "a2", "a3", "a4"):
        pool.add(name, bert[2][name])
        pool.logits(ids, mask, name)
        assert "a0" in pool.cached and pool.cached_bytes <= cap
    pool.unpin("a0")
    pool.logits(ids, mask, "a1")
    pool.logits(ids, mask, "a2")
    assert "a0" not in pool.cached and pool.cached_bytes <= cap


def test_adapter_that_cannot_fit_is_refused_without_evicting(bert, entry_bytes):
    pool = AdapterPool(bert[0], cap_bytes=entry_bytes - 1)
    with pytest.raises(AdapterError, match="'a0' needs .* more than the pool's cap_bytes"):
        pool.add("a0", bert[2]["a0"])
    assert pool.names == []
    pool = pool_with(bert, ["a0", "a1"], cap_bytes=int(2.5 * entry_bytes))
    pool.pin("a0")
    pool.pin("a1")
    with pytest.raises(AdapterError, match="pinned adapters hold"):
        pool.add("a2", bert[2]["a2"])
    assert pool.cached == ["a0", "a1"] and pool.names == ["a0", "a1"]


def test_unknown_or_bad_adapter_specs_are_typed_errors(bert):
    pool = pool_with(bert, ["a0", "a1"])
    ids, mask = batch(bert[0].manifest)
    with pytest.raises(AdapterError, match=r"^unknown adapter 'zz'; added: a0, a1$"):
        pool.logits(ids, mask, "zz")
    with pytest.raises(AdapterError, match="unknown adapter 'zz'"):
        pool.logits(ids, mask, {"a0": 0.5, "zz": 0.5})
    with pytest.raises(AdapterError, match="mixing weight of adapter 'a1' is nan"):
        pool.logits(ids, mask, {"a0": 0.5, "a1": float("nan")})
    with pytest.raises(AdapterError, match="non-empty"):
        pool.logits(ids, mask, {})
    with pytest.raises(AdapterError, match="already added"):
        pool.add("a0", bert[2]["a1"])
    with pytest.raises(AdapterError, match="unknown adapter"):
        pool.pin("zz")


def test_a_bad_or_foreign_delta_is_refused_at_add(bert, tmp_path):
    b, deltas, _ = bert
    pool = AdapterPool(b)
    (tmp_path / "junk.delta").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DeltaError, match="^junk.delta: "):
        pool.add("junk", tmp_path / "junk.delta")
    save_delta(tmp_path / "other.delta", replace_meta(deltas["a0"], base_fingerprint="f" * 64))
    with pytest.raises(DeltaError, match="^other.delta: delta is for base ffff"):
        pool.add("other", tmp_path / "other.delta")
    assert pool.names == [] and pool.cached == []


def test_classify_with_an_adapter_uses_it(bert):
    b, deltas, _ = bert
    pool = pool_with(bert, ["a3"])
    texts = ["w1 w2 w3", "w40 w41 w77 w5"]
    ours = pool.classify(texts, "a3")
    ref = Predictor(b).classify(texts, [deltas["a3"]])
    assert [p.label for p in ours] == [p.label for p in ref]
    for p, q in zip(ours, ref):
        assert p.probabilities == pytest.approx(q.probabilities, abs=1e-6)
