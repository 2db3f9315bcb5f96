"""Aggregation a fleet can trust, on deltas really trained on the tiny BERT bundle: a poisoned device among
honest ones, staleness weights (FedBuff's rule), a buffer of K per version, per-device sample caps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgepeft import methods
from edgepeft.delta.format import Delta, delta_bytes, delta_from_init, replace_meta
from edgepeft.delta.merge import merge
from edgepeft.hub import aggregate as agg
from edgepeft.hub import limits
from edgepeft.hub.backends import open_store
from edgepeft.hub.store import DeltaRec, sha256_hex
from edgepeft.runtime.data import load_dataset
from edgepeft.runtime.evaluate import evaluate
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.text import load_tokenizer
from edgepeft.runtime.trainer import TrainConfig, Trainer
from edgepeft.names import slot_name
from synthetic_tasks import word_group_rows, write_jsonl

HONEST = 4
PLAIN = {"clip_median": None, "trim": 0.0}  # the defences off: a plain weighted mean


def store_with_fleet(tmp_path, bundle_dir, name="f", **fleet):
    store = open_store(str(tmp_path / "store"))
    files = {p.name: p.read_bytes() for p in bundle_dir.iterdir() if p.is_file()}
    rec, _ = store.add_bundle(files["manifest.json"].decode(), files)
    store.create_fleet(name, rec.fingerprint, **fleet)
    return store


def upload(store, delta: Delta, fleet="f", received=0.0) -> str:
    data = delta_bytes(delta)
    store.add_delta(DeltaRec(sha256_hex(data), fleet, delta.meta.creator, delta.meta.adapter, delta.meta.parent or 0,
                             delta.meta.samples, len(data), received), data)
    return sha256_hex(data)


def pulled(store, v, manifest) -> Delta:
    """The version as devices pull it: its packed form."""
    return agg.parse_delta(store.get_blob(v.report["packed"]["sha256"]), f"v{v.version}", manifest)


def train_round(b, root, tok, start: Delta | None, rnd: int) -> list[Delta]:
    """HONEST devices, each trained on a fresh shard of its own from ``start`` (None: the agent's default init)."""
    out = []
    for i in range(HONEST):
        shard = load_dataset(write_jsonl(root / f"r{rnd}d{i}.jsonl", word_group_rows(300, 100 * rnd + i)), b.manifest, tok)
        cfg = TrainConfig(epochs=2, lr=3e-2, batch_size=16, threads=1, checkpoint_every=0, creator=f"d{i}")
        d = Trainer(b, shard, cfg, start=start).fit().delta
        out.append(replace_meta(d, samples=300, parent=1 if start is not None else None))
    return out


@pytest.fixture(scope="module")
def round2(bundles, tmp_path_factory):
    """(bundle, held-out data, v1, honest deltas of round 2): round 1 from scratch aggregated into v1 by the hub's
    defaults, then every honest device trains from v1 on new data."""
    b = bundles("bert")
    root = tmp_path_factory.mktemp("robust")
    tok = load_tokenizer(b)
    held = load_dataset(write_jsonl(root / "val.jsonl", word_group_rows(300, 7)), b.manifest, tok)
    store = store_with_fleet(root, b.path)
    for d in train_round(b, root, tok, None, 1):
        upload(store, d)
    v1 = pulled(store, agg.aggregate(store, "f"), b.manifest)
    store.close()
    return b, held, v1, train_round(b, root, tok, v1, 2)


def poisoned(parent: Delta, honest: Delta, factor: float, manifest) -> Delta:
    """An attacker's delta: parent + factor * (honest - parent), exact in each method's space (negative: sign-flipped),
    at the bundle's LoRA rank; it also claims 10,000 samples."""
    tensors: dict[str, np.ndarray] = {}
    for module, groups in methods.by_module(honest.tensors).items():
        for method, kinds in groups.items():
            mine = {k: honest.tensors[n] for k, n in kinds.items()}
            theirs = {k: parent.tensors[n] for k, n in kinds.items()}
            lerped = method.lerp(module, theirs, mine, factor, (honest.scale, parent.scale))
            tensors.update({slot_name(module, k): v for k, v in lerped.items()})
    rank, scale = agg.bundle_lora(manifest)
    wide = replace_meta(Delta(tensors, honest.meta), rank=2 * rank, alpha=scale * 2 * rank)
    out, _ = merge([(wide, 1.0)], rank=rank, scale=scale)
    return replace_meta(out, creator="mallory", samples=10_000, parent=1, adapter="default")


def fleet_accuracy(tmp_path, b, held, v1, deltas, options=None) -> float:
    store = store_with_fleet(tmp_path, b.path)
    try:
        agg.publish(store, "f", "default", delta_bytes(v1))
        for d in deltas:
            upload(store, d)
        v = agg.aggregate(store, "f", options=options)
        return evaluate(Predictor(b), held, [pulled(store, v, b.manifest)])["accuracy"]
    finally:
        store.close()


@pytest.mark.parametrize("factor", [-10.0, 100.0], ids=["sign-flipped", "scaled"])
def test_a_poisoned_device_moves_the_fleet_adapter_less_than_a_point(round2, tmp_path, factor):
    b, held, v1, honest = round2
    bad = poisoned(v1, honest[0], factor, b.manifest)
    clean = fleet_accuracy(tmp_path / "clean", b, held, v1, honest)
    attacked = fleet_accuracy(tmp_path / "attacked", b, held, v1, honest + [bad])
    undefended = fleet_accuracy(tmp_path / "undefended", b, held, v1, honest + [bad], PLAIN)
    print(f"{factor:+g}: v1 {evaluate(Predictor(b), held, [v1])['accuracy']:.4f}; v2 honest-only {clean:.4f}, "
          f"with the poisoned device {attacked:.4f}, with the defaults off {undefended:.4f}")
    assert clean > 0.6  # the honest fleet learned the task (3 classes)
    assert attacked >= clean - 0.01
    assert undefended < clean - 0.05  # the attack is real: the defaults are what stop it


def test_a_stale_delta_weighs_one_over_sqrt_one_plus_staleness(hub_bundle, tmp_path):
    from edgepeft.manifest import read_manifest

    manifest = read_manifest(hub_bundle)
    store = store_with_fleet(tmp_path, hub_bundle, staleness=3)
    for _ in range(3):  # versions 1..3
        agg.publish(store, "f", "default", delta_bytes(delta_from_init(manifest, 0)))
    heads = {}
    for device, parent, value in (("fresh", 3, 1.0), ("late", 1, 5.0), ("later", 0, 9.0)):
        d = delta_from_init(manifest, 0)
        d.tensors["head.weight"] = np.full_like(d.tensors["head.weight"], value)
        heads[device] = (parent, value)
        upload(store, replace_meta(d, creator=device, samples=10, parent=parent))
    v = agg.aggregate(store, "f", options=PLAIN)
    w = {dev: 10 / math.sqrt(1 + 3 - p) for dev, (p, _) in heads.items()}  # staleness = 3 (latest) - parent
    want = sum(w[dev] * val for dev, (_, val) in heads.items()) / sum(w.values())
    got = agg.parse_delta(store.get_blob(v.sha256), "v4", manifest).tensors["head.weight"]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert (v.report["stale"], v.report["max_staleness"]) == (2, 3)
    store.close()


def test_staleness_factor_is_fedbuffs_polynomial_rule():
    assert [limits.staleness_factor(s) for s in (0, 1, 3, 8)] == [1.0, 1 / math.sqrt(2), 0.5, 1 / 3]
    with pytest.raises(Exception, match="not yet published"):
        limits.staleness_factor(-1)


def test_a_version_takes_the_first_k_deltas_and_the_rest_wait(hub_bundle, tmp_path):
    from edgepeft.manifest import read_manifest

    manifest = read_manifest(hub_bundle)
    store = store_with_fleet(tmp_path, hub_bundle, aggregate_every=3)
    ids = []
    for i in range(7):
        d = delta_from_init(manifest, 0)
        d.tensors["head.weight"] += np.float32(i)
        ids.append(upload(store, replace_meta(d, creator=f"d{i}", samples=5), received=float(i)))
    assert agg.aggregate(store, "f").report["count"] == 3
    assert agg.maybe_aggregate(store, "f").version == 2  # policy: 4 pending >= 3, one more version of 3
    members = [[d.id for d in store.list_deltas("f", "default", version=v)] for v in (1, 2)]
    assert members == [ids[:3], ids[3:6]]  # by arrival; none lost, none twice
    assert [d.id for d in store.list_deltas("f", pending=True)] == ids[6:]
    store.close()


def test_sample_weights_are_capped_per_device_and_round():
    # cap: the median claim (10); device a sent five deltas of 10 into one version: it shares one cap among them
    assert limits.sample_weights([10] * 6, None, ["a"] * 5 + ["b"]) == [2.0] * 5 + [10]
    assert limits.sample_weights([10] * 6, 40, ["a"] * 5 + ["b"]) == [8.0] * 5 + [10]
    assert limits.sample_weights([10, 10], None, ["a", "b"]) == [10, 10]
