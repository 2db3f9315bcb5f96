"""Mixed LoRA ranks in one fleet: devices of rank 1, 2 and 4 on one rank-4 bundle, aggregated exactly in ΔW
space and refitted to each device's rank on pull, against a numpy reference (truncated SVD of the weighted
mean ΔW); a rank the fleet does not take is refused and nothing is lost or counted twice."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from edgepeft.delta.format import Delta, DeltaMeta, delta_bytes, delta_from_bytes
from edgepeft.delta.merge import space_parts
from edgepeft.delta.ranks import cut_rank, pad_rank, rebase
from edgepeft.delta.transport import unpack
from edgepeft.errors import DeltaError, TrainError
from edgepeft.hub.app import create_app
from edgepeft.hub.backends import open_store
from edgepeft.manifest import read_manifest
from edgepeft.names import slot_name
from test_hub_api import ADMIN, H, bundle_tar

RANKS = (1, 2, 4)  # the synthetic hub bundle is exported at rank 4, alpha 8 (scale 2)
DEVICES = {"d1": 1, "d2": 1, "d3": 2, "d4": 2, "d5": 4, "d6": 4}
MODULES = ("enc.0.q", "enc.0.v")
PLAIN = {"clip_median": None, "trim": 0.0}  # the plain mean: what the numpy reference computes


def best_fit(w: np.ndarray, rank: int) -> np.ndarray:
    """The numpy reference: the best rank-``rank`` approximation of ``w`` (Eckart-Young)."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def factors(w: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with scale·B@A the best rank-``rank`` fit of ``w``."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(s[:rank] / scale)
    return (root[:, None] * vt[:rank]).astype(np.float32), (u[:, :rank] * root).astype(np.float32)


def device_delta(manifest, device: str, rank: int, targets: dict[str, np.ndarray], vectors: dict[str, np.ndarray],
                 parent: int | None) -> Delta:
    """What a device of ``rank`` that learned ``targets`` (ΔW per module) sends: their best rank-``rank`` fit."""
    scale = manifest.slots[0].scale
    tensors = dict(vectors)
    for m in MODULES:
        tensors[slot_name(m, "lora_A")], tensors[slot_name(m, "lora_B")] = factors(targets[m], rank, scale)
    meta = DeltaMeta(base_fingerprint=manifest.fingerprint, method=manifest.method, rank=rank, alpha=scale * rank,
                     adapter="default", parent=parent, samples=10, creator=device)
    return Delta(tensors, meta)


def shapes(manifest) -> dict[str, tuple[int, int]]:
    return {s.module: (manifest.slots[[t.name for t in manifest.slots].index(slot_name(s.module, "lora_B"))].shape[0], s.shape[1])
            for s in manifest.slots if s.kind == "lora_A"}


def dw(d: Delta) -> dict[str, np.ndarray]:
    return {m: space_parts(d)[f"{m}:dW"] for m in MODULES}


def rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.fixture
def fleet(tmp_path, hub_bundle):
    """(client, manifest, tokens, store): fleet "mixed" taking ranks 1, 2, 4 with the plain mean."""
    store = open_store(str(tmp_path / "store"))
    app = create_app(store, admin_token=ADMIN, policy_interval_s=0)
    with TestClient(app) as client:
        fp = client.post("/api/v1/bundles", content=bundle_tar(hub_bundle), headers=H(ADMIN)).json()["fingerprint"]
        r = client.post("/api/v1/fleets", json={"name": "mixed", "bundle": fp, "ranks": list(RANKS), "robust": PLAIN},
                        headers=H(ADMIN))
        assert r.status_code == 201, r.text
        assert r.json()["ranks"] == list(RANKS)
        tokens = {d: client.post("/api/v1/fleets/mixed/devices", json={"device": d}, headers=H(ADMIN)).json()["token"]
                  for d in DEVICES}
        yield client, read_manifest(hub_bundle), tokens, store
    store.close()


def push(client, tokens, d: Delta):
    return client.post(f"/api/v1/devices/{d.meta.creator}/deltas", content=delta_bytes(d), headers=H(tokens[d.meta.creator]))


def aggregate(client) -> int:
    r = client.post("/api/v1/fleets/mixed/adapters/default/aggregate", headers=H(ADMIN))
    assert r.status_code == 201, r.text
    return r.json()["version"]


def pull(client, token, manifest, version: int, rank: int | None = None, form: str = "packed") -> Delta:
    params = {"form": form, **({"rank": rank} if rank else {})}
    r = client.get(f"/api/v1/fleets/mixed/adapters/default/versions/{version}", params=params, headers=H(token))
    assert r.status_code == 200, r.text
    return unpack(r.content, manifest=manifest) if form == "packed" else delta_from_bytes(r.content, "pulled", manifest)


def round_one(client, tokens, manifest, rng) -> tuple[dict[str, np.ndarray], list[Delta]]:
    """Every device sends its best fit of a shared rank-3 signal plus its own noise; (the true mean ΔW, deltas)."""
    shared = {m: rng.standard_normal((o, 3)) @ rng.standard_normal((3, i)) * 0.05 for m, (o, i) in shapes(manifest).items()}
    truth = {m: np.zeros_like(w) for m, w in shared.items()}
    sent = []
    for dev, rank in DEVICES.items():
        target = {m: w + 0.02 * rng.standard_normal(w.shape) for m, w in shared.items()}
        vectors = {"enc.0.q.bias": rng.standard_normal(16).astype(np.float32) * 0.01,
                   "head.weight": rng.standard_normal((3, 16)).astype(np.float32) * 0.01}
        d = device_delta(manifest, dev, rank, target, vectors, None)
        assert push(client, tokens, d).status_code == 201
        sent.append(d)
        for m in truth:
            truth[m] += target[m] / len(DEVICES)
    return truth, sent


def test_mixed_ranks_merge_exactly_in_dw_space_and_beat_zero_padded_factors(fleet):
    client, manifest, tokens, _ = fleet
    truth, sent = round_one(client, tokens, manifest, np.random.default_rng(0))
    v1 = pull(client, tokens["d5"], manifest, aggregate(client), form="raw")
    scale = manifest.slots[0].scale
    for m in MODULES:
        reference = best_fit(np.mean([dw(d)[m] for d in sent], axis=0), 4)  # numpy: mean ΔW, best rank-4 fit
        assert rel(dw(v1)[m], reference) < 1e-5
        # the alternative: pad every device's factors to rank 4 with zeros and average A and B separately
        a = np.mean([pad_rank(d, 4).tensors[slot_name(m, "lora_A")] for d in sent], axis=0)
        b = np.mean([pad_rank(d, 4).tensors[slot_name(m, "lora_B")] for d in sent], axis=0)
        zero_padded = scale * b.astype(np.float64) @ a
        assert rel(dw(v1)[m], truth[m]) < 0.8 * rel(zero_padded, truth[m])  # 0.31 vs 0.48 here
    assert np.allclose(v1.tensors["head.weight"], np.mean([d.tensors["head.weight"] for d in sent], axis=0), atol=1e-7)


def test_each_rank_pulls_the_version_refitted_to_it(fleet):
    client, manifest, tokens, _ = fleet
    round_one(client, tokens, manifest, np.random.default_rng(1))
    v = aggregate(client)
    full = pull(client, tokens["d1"], manifest, v, form="raw")
    for rank in (1, 2):
        mine = pull(client, tokens["d1"], manifest, v, rank=rank, form="raw")
        assert mine.meta.rank == rank and mine.tensors["enc.0.q.lora_A"].shape == (rank, 24)
        for m in MODULES:
            assert rel(dw(mine)[m], best_fit(dw(full)[m], rank)) < 1e-5
        assert pull(client, tokens["d1"], manifest, v, rank=rank).meta.rank == rank  # packed, as devices pull it
    r = client.get(f"/api/v1/fleets/mixed/adapters/default/versions/{v}", params={"rank": 3}, headers=H(tokens["d1"]))
    assert r.status_code == 404 and "rank 4 and 1, 2" in r.json()["detail"]


def test_a_lower_rank_device_counts_its_update_not_the_truncation_it_started_from(fleet):
    client, manifest, tokens, _ = fleet
    rng = np.random.default_rng(2)
    round_one(client, tokens, manifest, rng)
    v1 = aggregate(client)
    full = pull(client, tokens["d1"], manifest, v1, form="raw")
    updates, sent, starts = [], [], []
    for dev, rank in DEVICES.items():
        start = pull(client, tokens[dev], manifest, v1, rank=rank if rank < 4 else None)  # what the device trains from
        update = {m: 0.01 * rng.standard_normal(w.shape) for m, w in dw(start).items()}
        vectors = {k: v + np.float32(0.001) for k, v in start.tensors.items() if "lora" not in k}
        d = device_delta(manifest, dev, rank, {m: dw(start)[m] + update[m] for m in MODULES}, vectors, v1)
        assert push(client, tokens, d).status_code == 201
        # the hub measures a lower rank's update from the rank form it pulled; a full-rank delta counts as it is (its
        # packed pull differs from the float32 version by the transport's error bound, as before mixed ranks)
        base = start if rank < 4 else full
        updates.append({m: dw(d)[m] - dw(base)[m] for m in MODULES})
        sent.append(d)
        starts.append(base)
    v2 = pull(client, tokens["d1"], manifest, aggregate(client), form="raw")
    for m in MODULES:
        learned = np.mean([u[m] for u in updates], axis=0)
        reference = best_fit(dw(full)[m] + learned, 4)  # the full v1 plus what the devices learned, at rank 4
        assert rel(dw(v2)[m], reference) < 1e-4
        naive = best_fit(np.mean([dw(d)[m] for d in sent], axis=0), 4)  # lower ranks' truncation counted as an update
        assert rel(naive, reference) > 10 * rel(dw(v2)[m], reference)
    bias = np.mean([d.tensors["enc.0.q.bias"] - s.tensors["enc.0.q.bias"] for d, s in zip(sent, starts)], axis=0)
    assert np.allclose(v2.tensors["enc.0.q.bias"], full.tensors["enc.0.q.bias"] + bias, atol=1e-6)


def test_a_rank_the_fleet_does_not_take_is_refused_and_nothing_is_lost_or_counted_twice(fleet):
    client, manifest, tokens, store = fleet
    rng = np.random.default_rng(3)
    w = {m: rng.standard_normal(s) * 0.05 for m, s in shapes(manifest).items()}
    vectors = {"enc.0.q.bias": np.zeros(16, np.float32), "head.weight": np.zeros((3, 16), np.float32)}
    r = push(client, tokens, device_delta(manifest, "d3", 3, w, vectors, None))
    assert r.status_code == 409
    assert "rank 3" in r.json()["detail"] and "ranks 1, 2, 4" in r.json()["detail"] and "--rank" in r.json()["detail"]
    assert store.list_deltas("mixed", "default") == []
    good = device_delta(manifest, "d3", 2, w, vectors, None)
    assert push(client, tokens, good).status_code == 201
    assert push(client, tokens, good).status_code == 200  # a retry: stored once
    v = aggregate(client)
    assert [d.version for d in store.list_deltas("mixed", "default")] == [v]
    assert client.get(f"/api/v1/fleets/mixed/adapters/default/versions/{v}/info", headers=H(ADMIN)).json()["report"]["count"] == 1


def test_fleet_ranks_above_the_bundle_rank_are_refused(fleet):
    client, _, _, _ = fleet
    fp = client.get("/api/v1/bundles", headers=H(ADMIN)).json()[0]["fingerprint"]
    r = client.post("/api/v1/fleets", json={"name": "big", "bundle": fp, "ranks": [4, 8]}, headers=H(ADMIN))
    assert r.status_code in (400, 422) and "1..4" in r.text


def test_pad_then_cut_is_lossless_and_cut_refuses_a_higher_rank(hub_bundle):
    manifest = read_manifest(hub_bundle)
    rng = np.random.default_rng(4)
    w = {m: rng.standard_normal(s) for m, s in shapes(manifest).items()}
    vectors = {"enc.0.q.bias": np.ones(16, np.float32), "head.weight": np.ones((3, 16), np.float32)}
    d = device_delta(manifest, "d", 2, w, vectors, None)
    padded = pad_rank(d, 4)
    assert padded.tensors["enc.0.v.lora_B"].shape == (24, 4)
    assert all(np.array_equal(v, cut_rank(padded, 2).tensors[k]) for k, v in d.tensors.items())
    with pytest.raises(DeltaError, match="past rank 1"):
        cut_rank(padded, 1)
    back = rebase(d, d, padded)  # d - d + padded: the parent's ΔW exactly
    for m in MODULES:
        assert rel(dw(back)[m], dw(d)[m]) < 1e-6


def test_a_lower_rank_trains_as_that_rank_on_the_bundle_graph(bundles, tmp_path):
    from edgepeft.runtime.data import load_dataset
    from edgepeft.runtime.text import load_tokenizer
    from edgepeft.runtime.trainer import TrainConfig, Trainer
    from synthetic_tasks import word_group_rows, write_jsonl

    b = bundles("bert")  # LoRA rank 4
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", word_group_rows(64, 0)), b.manifest, load_tokenizer(b))
    cfg = TrainConfig(epochs=1, batch_size=16, lr=3e-2, threads=1, checkpoint_every=0, rank=2)
    d = Trainer(b, data, cfg).fit().delta  # the padding past rank 2 is cut off and checked to be exactly zero
    a = [n for n in d.tensors if n.endswith("lora_A")]
    assert d.meta.rank == 2 and all(d.tensors[n].shape[0] == 2 for n in a)
    assert any(np.any(d.tensors[n.replace("lora_A", "lora_B")]) for n in a)  # it learned something
    with pytest.raises(TrainError, match="above the bundle's LoRA rank 4"):
        Trainer(b, data, TrainConfig(rank=8))
    with pytest.raises(TrainError, match="pull the version at rank 4"):
        Trainer(b, data, TrainConfig(rank=4), start=d)


def test_a_store_made_before_fleet_ranks_gains_the_column_and_its_fleets_take_the_bundle_rank(tmp_path):
    import sqlite3

    (tmp_path / "store").mkdir()
    old = sqlite3.connect(tmp_path / "store" / "hub.sqlite3")
    old.execute("CREATE TABLE fleets (name TEXT PRIMARY KEY, bundle TEXT NOT NULL, aggregate_every INTEGER NOT NULL, "
                "aggregate_minutes DOUBLE PRECISION NOT NULL, staleness INTEGER NOT NULL, robust TEXT NOT NULL, "
                "created DOUBLE PRECISION NOT NULL)")  # the schema before ranks
    old.execute("INSERT INTO fleets VALUES ('old', 'f' , 0, 0, 2, '{}', 0)")
    old.commit()
    old.close()
    store = open_store(str(tmp_path / "store"))
    assert store.get_fleet("old").ranks == ()
    store.close()
