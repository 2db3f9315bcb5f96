"""Merging in ΔW space: exactness, SVD truncation error, weights, streaming, and refusals."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from edgepeft.delta import Delta, DeltaMeta, diff, load_delta, merge, save_delta
from edgepeft.delta.merge import refactor
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest, Slot

FP = "e" * 64
OUT, IN = 24, 40


def make_manifest(rank: int = 4) -> Manifest:
    slots = []
    for m in ("l0.q", "l1.q"):
        slots += [Slot(f"{m}.lora_A", "lora_A", m, (rank, IN), rank=rank, alpha=2.0 * rank), Slot(f"{m}.lora_B", "lora_B", m, (OUT, rank), rank=rank, alpha=2.0 * rank)]
    slots += [Slot("l0.q.bias", "bias", "l0.q", (OUT,)), Slot("head.weight", "weight", "head", (3, IN))]
    return Manifest(
        fingerprint=FP, source="tiny", architecture="Tiny", model_type="bert", task="sequence-classification",
        method="lora+bitfit", quantization="none", max_length=16, vocab_size=100, pad_token_id=0, slots=tuple(slots), graphs={},
    )


def make_delta(rng: np.random.Generator, rank: int = 4, alpha: float = 8.0, samples: int = 1, a_shared: dict | None = None) -> Delta:
    """Random delta; with ``a_shared`` every delta uses the same A per module, so sums of ΔW keep rank ``rank``."""
    t = {}
    for m in ("l0.q", "l1.q"):
        t[f"{m}.lora_A"] = a_shared[m] if a_shared else rng.standard_normal((rank, IN)).astype(np.float32)
        t[f"{m}.lora_B"] = rng.standard_normal((OUT, rank)).astype(np.float32)
    t["l0.q.bias"] = rng.standard_normal(OUT).astype(np.float32)
    t["head.weight"] = rng.standard_normal((3, IN)).astype(np.float32)
    return Delta(t, DeltaMeta(base_fingerprint=FP, method="lora+bitfit", rank=rank, alpha=alpha, samples=samples))


def expected_dw(deltas: list[Delta], weights: list[float], module: str) -> np.ndarray:
    w = np.asarray(weights, np.float64) / sum(weights)
    return sum(wi * d.scale * (d.tensors[f"{module}.lora_B"].astype(np.float64) @ d.tensors[f"{module}.lora_A"].astype(np.float64)) for wi, d in zip(w, deltas))


def test_merged_dw_equals_weighted_sum_and_error_is_zero_at_true_rank():
    rng = np.random.default_rng(0)
    shared = {m: rng.standard_normal((4, IN)).astype(np.float32) for m in ("l0.q", "l1.q")}
    ds = [make_delta(rng, a_shared=shared) for _ in range(3)]
    for rank in (4, 6):
        merged, report = merge(ds, [1.0, 2.0, 5.0], rank=rank)
        for m in ("l0.q", "l1.q"):
            np.testing.assert_allclose(merged.delta_w(m), expected_dw(ds, [1, 2, 5], m), rtol=1e-5, atol=1e-5)
            assert report.errors[m] < 1e-6
        assert merged.tensors["l0.q.lora_A"].shape == (rank, IN)


def test_truncation_error_matches_svd_tail():
    rng = np.random.default_rng(1)
    ds = [make_delta(rng) for _ in range(3)]  # independent A: ΔW has rank 12
    merged, report = merge(ds, [1, 1, 1], rank=4)
    for m in ("l0.q", "l1.q"):
        s = np.linalg.svd(expected_dw(ds, [1, 1, 1], m), compute_uv=False)
        want = np.sqrt((s[4:] ** 2).sum() / (s**2).sum())
        assert report.errors[m] == pytest.approx(want, rel=1e-4)
        assert np.linalg.norm(merged.delta_w(m) - expected_dw(ds, [1, 1, 1], m)) / np.linalg.norm(expected_dw(ds, [1, 1, 1], m)) == pytest.approx(want, rel=1e-4)


def test_merge_of_one_delta_is_identity_in_dw_space():
    d = make_delta(np.random.default_rng(2), rank=4, alpha=4.0)
    merged, report = merge([d])
    for m in ("l0.q", "l1.q"):
        np.testing.assert_allclose(merged.delta_w(m), d.delta_w(m), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged.tensors["head.weight"], d.tensors["head.weight"], rtol=1e-6)
    assert (merged.meta.rank, merged.scale) == (4, 1.0)


def test_bias_and_weight_slots_are_weighted_means():
    rng = np.random.default_rng(3)
    a, b = make_delta(rng), make_delta(rng)
    merged, _ = merge([(a, 1.0), (b, 3.0)])
    np.testing.assert_allclose(merged.tensors["l0.q.bias"], 0.25 * a.tensors["l0.q.bias"] + 0.75 * b.tensors["l0.q.bias"], rtol=1e-6)


def test_default_weights_are_sample_counts():
    rng = np.random.default_rng(4)
    a, b = make_delta(rng, samples=10), make_delta(rng, samples=30)
    merged, report = merge([a, b])
    np.testing.assert_allclose(merged.tensors["head.weight"], 0.25 * a.tensors["head.weight"] + 0.75 * b.tensors["head.weight"], rtol=1e-6)
    assert merged.meta.samples == 40 and report.total_weight == 40


def test_inputs_of_different_rank_and_scale_merge_in_dw_space():
    rng = np.random.default_rng(5)
    a, b = make_delta(rng, rank=2, alpha=8.0), make_delta(rng, rank=4, alpha=4.0)
    merged, report = merge([a, b], [1, 1], rank=6, scale=0.5)
    assert (merged.meta.rank, merged.meta.alpha, merged.scale) == (6, 3.0, 0.5)
    np.testing.assert_allclose(merged.delta_w("l0.q"), expected_dw([a, b], [1, 1], "l0.q"), rtol=1e-5, atol=1e-5)


def test_output_fits_the_bundle_for_training(tmp_path):
    rng = np.random.default_rng(6)
    merged, _ = merge([make_delta(rng), make_delta(rng)], [1, 1])
    save_delta(tmp_path / "m.delta", merged)
    load_delta(tmp_path / "m.delta", make_manifest(), for_training=True)


def test_merge_of_fresh_deltas_keeps_a_trainable():
    d = make_delta(np.random.default_rng(7))
    d.tensors["l0.q.lora_B"][:] = 0  # as delta_from_init: ΔW = 0
    merged, report = merge([d])
    assert not merged.tensors["l0.q.lora_B"].any() and not merged.delta_w("l0.q").any()
    a = merged.tensors["l0.q.lora_A"]
    np.testing.assert_allclose(a @ a.T, np.eye(4) / 3, atol=1e-6)  # orthogonal rows at kaiming norm
    assert report.errors["l0.q"] == 0.0


def test_refactor_pads_rank_beyond_matrix_size():
    a, b, err = refactor(np.ones((2, 3)), rank=5, scale=1.0)
    assert a.shape == (5, 3) and b.shape == (2, 5) and err < 1e-7


def test_streaming_merge_of_1000_deltas_keeps_memory_flat():
    def stream():
        rng = np.random.default_rng(8)
        for _ in range(1000):
            yield make_delta(rng, rank=8)

    total_bytes = 1000 * sum(t.nbytes for t in make_delta(np.random.default_rng(0), rank=8).tensors.values())
    tracemalloc.start()
    try:
        merged, report = merge(stream())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.count == 1000 and merged.meta.samples == 1000
    assert peak < total_bytes / 10
    rng = np.random.default_rng(8)
    mean_bias = sum(make_delta(rng, rank=8).tensors["l0.q.bias"].astype(np.float64) for _ in range(1000)) / 1000
    np.testing.assert_allclose(merged.tensors["l0.q.bias"], mean_bias, rtol=1e-5, atol=1e-6)


def test_different_bases_refused():
    rng = np.random.default_rng(9)
    a, b = make_delta(rng), make_delta(rng)
    b.meta.base_fingerprint = "f" * 64
    with pytest.raises(DeltaError, match="delta #2.*is for base"):
        merge([a, b], [1, 1])


def test_different_slot_sets_refused():
    rng = np.random.default_rng(10)
    a, b = make_delta(rng), make_delta(rng)
    del b.tensors["head.weight"]
    with pytest.raises(DeltaError, match="missing \\['head.weight'\\]"):
        merge([a, b], [1, 1])


def test_zero_total_weight_refused():
    with pytest.raises(DeltaError, match="sum to 0"):
        merge([make_delta(np.random.default_rng(11), samples=0)])


def test_weight_count_mismatch_refused():
    rng = np.random.default_rng(12)
    with pytest.raises(DeltaError, match="fewer weights"):
        merge([make_delta(rng), make_delta(rng)], [1.0])
    with pytest.raises(DeltaError, match="more weights"):
        merge([make_delta(rng)], [1.0, 2.0])


def test_negative_weight_refused():
    with pytest.raises(DeltaError, match="finite and >= 0"):
        merge([make_delta(np.random.default_rng(13))], [-1.0])


def test_no_deltas_refused():
    with pytest.raises(DeltaError, match="no deltas"):
        merge([])


def test_diff_of_equal_deltas_is_zero_and_reports_dw():
    d = make_delta(np.random.default_rng(14))
    rows = diff(d, d)
    assert "l0.q:dW" in rows and "head.weight" in rows
    assert all(v == (0.0, 0.0) for v in rows.values())


def test_diff_sees_refactored_delta_as_same_update():
    d = make_delta(np.random.default_rng(15))
    merged, _ = merge([d])
    rows = diff(merged, d)
    assert rows["l0.q:dW"][1] < 1e-6 and rows["l0.q.lora_A"][1] > 0.1


def test_many_deltas_merge_to_the_exact_weighted_mean_of_their_updates():
    """More deltas than one batched product takes (merge.FLUSH_EVERY): ΔW is still the exact weighted mean."""
    from edgepeft.delta.merge import FLUSH_EVERY

    rng = np.random.default_rng(12)
    n = 2 * FLUSH_EVERY + 5
    deltas = [make_delta(rng, rank=2) for _ in range(n)]
    weights = rng.uniform(0.5, 3.0, n)
    merged, _ = merge(list(zip(deltas, weights)), rank=min(OUT, IN))  # full rank: the re-factoring is exact
    for m in ("l0.q", "l1.q"):
        want = sum(w * d.scale * (d.tensors[f"{m}.lora_B"].astype(np.float64) @ d.tensors[f"{m}.lora_A"])
                   for d, w in zip(deltas, weights)) / weights.sum()
        got = merged.scale * (merged.tensors[f"{m}.lora_B"].astype(np.float64) @ merged.tensors[f"{m}.lora_A"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
