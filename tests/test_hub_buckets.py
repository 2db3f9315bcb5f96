"""The hub's default merge in a round of more deltas than buckets (hub/buckets.py: the trimmed mean over 32 bucket
means): a poisoned device among many honest ones leaves the version near the honest-only one, and the same deltas
make the same version whatever order they were claimed in."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgepeft.delta.format import Delta, delta_bytes, delta_from_bytes, delta_from_init, file_meta, replace_meta
from edgepeft.delta.merge import space_parts
from edgepeft.errors import HubError
from edgepeft.hub import aggregate as agg
from edgepeft.hub import buckets
from edgepeft.hub.backends import open_store
from edgepeft.hub.robust import RobustOptions
from edgepeft.hub.store import DeltaRec, sha256_hex
from edgepeft.manifest import read_manifest

HONEST = 120  # devices in the round: well above the 32 buckets
PLAIN = {"clip_median": None, "trim": 0.0}


def honest(manifest, i: int) -> Delta:
    """A shared direction (seed 0) plus this device's own noise of the same size: every slot, LoRA factors too."""
    common, own = np.random.default_rng(0), np.random.default_rng(1 + i)
    d = delta_from_init(manifest, 0)
    tensors = {s.name: (0.1 * common.standard_normal(s.shape) + 0.1 * own.standard_normal(s.shape)).astype(np.float32)
               for s in manifest.slots}
    return replace_meta(Delta(tensors, d.meta), samples=10, creator=f"d{i}")


def poisoned(manifest, factor: float) -> Delta:
    """An honest-looking delta times ``factor`` in every slot's space (for LoRA: B scaled, A kept, so ΔW is scaled),
    claiming 10,000 samples."""
    d = honest(manifest, 10_000)
    tensors = {k: v if k.endswith("lora_A") else v * np.float32(factor) for k, v in d.tensors.items()}
    return replace_meta(Delta(tensors, d.meta), samples=10_000, creator="evil")


def version(tmp_path, hub_bundle, blobs: list[bytes], options: dict) -> tuple[dict[str, np.ndarray], dict]:
    """The space parts (ΔW for LoRA) and report of the version a fresh fleet makes from the delta files ``blobs``,
    uploaded in this order."""
    store = open_store(str(tmp_path / f"store-{len(list(tmp_path.iterdir()))}"))
    files = {p.name: p.read_bytes() for p in hub_bundle.iterdir()}
    rec, _ = store.add_bundle(files["manifest.json"].decode(), files)
    store.create_fleet("f", rec.fingerprint)
    manifest = read_manifest(hub_bundle)
    for i, data in enumerate(blobs):
        meta = file_meta(data, "test", manifest)
        store.add_delta(DeltaRec(sha256_hex(data), "f", meta.creator, "default", 0, meta.samples, len(data), float(i)), data)
    v = agg.aggregate(store, "f", options=options)
    out = delta_from_bytes(store.get_blob(v.sha256), "v", manifest)
    store.close()
    return space_parts(out), v.report


def distance(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((x[k] - y[k]) ** 2)) for k in x))


@pytest.mark.parametrize("factor", [100.0, -10.0], ids=["scaled x100", "sign-flipped x-10"])
def test_a_poisoned_device_in_a_large_round_leaves_the_default_version_near_the_honest_one(tmp_path, hub_bundle, factor):
    """Under attack the default version stays as near the honest devices' plain mean as it is without one (what
    clipping and trimming cost: ``cost``), give or take a quarter of what the attack does to the plain mean."""
    manifest = read_manifest(hub_bundle)
    good = [delta_bytes(honest(manifest, i)) for i in range(HONEST)]
    bad = good[:60] + [delta_bytes(poisoned(manifest, factor))] + good[60:]
    plain_good, _ = version(tmp_path, hub_bundle, good, PLAIN)
    plain_bad, _ = version(tmp_path, hub_bundle, bad, PLAIN)
    robust_good, _ = version(tmp_path, hub_bundle, good, {})
    robust_bad, report = version(tmp_path, hub_bundle, bad, {})
    assert report["trimmed"] == {"over": "buckets", "buckets": 32, "deltas_per_bucket": [3, 4], "cut_each_end": 6}
    harm = distance(plain_bad, plain_good)  # what the attack does to the plain mean
    cost = distance(robust_good, plain_good)  # the defaults without an attacker: clipped, trimmed, other buckets
    assert distance(robust_bad, plain_good) < cost + 0.25 * harm


def test_the_same_deltas_make_the_same_version_in_any_claim_order(tmp_path, hub_bundle):
    manifest = read_manifest(hub_bundle)
    deltas = [delta_bytes(honest(manifest, i)) for i in range(50)]  # each serialized once: its id is its bytes' sha256
    first, report = version(tmp_path, hub_bundle, deltas, {})
    again, _ = version(tmp_path, hub_bundle, deltas[::-1], {})
    assert report["trimmed"]["over"] == "buckets"
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])


def test_buckets_are_runs_of_the_shuffled_order_that_change_every_round():
    ids = [sha256_hex(bytes([i])) for i in range(100)]
    order = buckets.shuffled(ids, 3)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert buckets.shuffled(ids[::-1], 3) == [99 - p for p in order]  # the same deltas in the same buckets
    assert buckets.shuffled(ids, 4) != order
    sizes = np.bincount(buckets.of(np.arange(100), 100, 32))
    assert len(sizes) == 32 and set(sizes) == {3, 4}
    assert list(buckets.of(np.arange(20), 20, 32)) == list(range(20))  # fewer deltas than buckets: one each


def test_buckets_too_few_to_trim_anything_are_refused_with_the_fix():
    with pytest.raises(HubError, match="cuts none; use at least 5 buckets"):
        RobustOptions.from_dict({"trim": 0.2, "buckets": 4})
    assert RobustOptions.from_dict({"trim": 0.0, "buckets": 1}).buckets == 1


@pytest.mark.parametrize("n", [3, 7, 32, 33])
def test_the_trimmed_mean_across_buckets_is_the_stable_argsorts_one_ties_included(n):
    """buckets.trimmed_across sorts 64-bit keys instead of argsorting: the same kept values and weights per coordinate,
    equal values cut in row order as the stable argsort cuts them (ties, -0.0 and 0.0, huge and subnormal values)."""
    from edgepeft.hub.robust import trimmed_mean

    rng = np.random.default_rng(n)
    means = rng.standard_normal((n, 3 * buckets.BLOCK // 2)).astype(np.float32)
    means[:, :50] = np.round(means[:, :50])  # many ties
    means[:, 50] = 0.0
    means[::2, 50] = -0.0
    means[:, 51] = np.float32(3e37)
    means[1:, 52] = np.float32(-1e-42)
    totals = rng.uniform(0.5, 5.0, n)
    sums = (means.astype(np.float64) * totals[:, None]).astype(np.float32)  # as the merge holds bucket sums
    got = buckets.trimmed_across(sums.reshape(n, 3, -1), totals, 0.2).reshape(-1)
    want = trimmed_mean((sums * (1.0 / totals)[:, None]).astype(np.float32), totals, 0.2)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)  # the sums may add in another order
