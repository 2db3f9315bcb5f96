"""One contract suite for the hub store, run on every backend (SQLite in tmp_path, a real PostgreSQL)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgepeft.delta.format import delta_bytes, delta_from_init, replace_meta
from edgepeft.errors import HubError
from edgepeft.hub.store import PUBLISHED, DeltaRec, hash_token, sha256_hex
from edgepeft.manifest import read_manifest


def _register(store, bundle_dir):
    files = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
    rec, added = store.add_bundle(files["manifest.json"].decode(), files)
    return rec


def _delta(manifest, seed, device="d1", parent=None, samples=10):
    d = delta_from_init(manifest, seed)
    d.tensors["head.weight"] += np.float32(seed)
    return delta_bytes(replace_meta(d, creator=device, parent=parent, samples=samples))


def _rec(store, data, fleet="f", device="d1", parent=0, samples=10):
    return DeltaRec(sha256_hex(data), fleet, device, "default", parent, samples, len(data), 1000.0)


@pytest.fixture
def fleet(hub_store, hub_bundle):
    rec = _register(hub_store, hub_bundle)
    hub_store.create_fleet("f", rec.fingerprint, staleness=2)
    return hub_store, read_manifest(hub_bundle)


def test_blobs_are_content_addressed_and_ranged(hub_store):
    sha = hub_store.put_blob(b"hello world")
    assert sha == sha256_hex(b"hello world")
    assert hub_store.put_blob(b"hello world") == sha  # idempotent
    assert hub_store.get_blob(sha) == b"hello world"
    assert hub_store.read_blob(sha, 6, 5) == b"world"
    assert hub_store.read_blob(sha, 6, 100) == b"world"
    with pytest.raises(HubError):
        hub_store.get_blob("0" * 64)
    with pytest.raises(HubError):
        hub_store.get_blob("../../etc/passwd")  # never a path


def test_small_and_large_blobs_read_back_whole_and_ranged(hub_store):
    """SQLite keeps small blobs in the database and large ones as files; either way the bytes come back the same."""
    from edgepeft.hub.sqlite_store import INLINE_MAX

    for size in (100, INLINE_MAX + 1):
        data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
        sha = hub_store.put_blob(data)
        assert hub_store.get_blob(sha) == data
        assert hub_store.read_blob(sha, size - 10, 100) == data[-10:]
        assert hub_store.read_blob(sha, 3, 4) == data[3:7]


def test_deltas_read_in_batches_come_back_in_order_small_and_large(hub_store, monkeypatch):
    """iter_delta_bytes reads several blobs a query; the order asked, and a blob the query cannot see (a file), hold."""
    from edgepeft.hub import store as store_mod
    from edgepeft.hub.sqlite_store import INLINE_MAX

    monkeypatch.setattr(store_mod, "READ_BATCH", 3)
    blobs = [np.random.default_rng(i).integers(0, 256, INLINE_MAX + 1 if i == 4 else 50 + i, np.uint8).tobytes()
             for i in range(7)]
    shas = [hub_store.put_blob(b) for b in blobs][::-1]
    assert list(hub_store.iter_delta_bytes(shas)) == list(zip(shas, blobs[::-1]))


def test_bundle_registered_once_with_files(hub_store, hub_bundle):
    rec = _register(hub_store, hub_bundle)
    again = _register(hub_store, hub_bundle)
    assert again.fingerprint == rec.fingerprint
    got = hub_store.get_bundle(rec.fingerprint)
    assert {f.name for f in got.files} == {"manifest.json", "weights.bin", "model.onnx", "train.onnx"}
    w = next(f for f in got.files if f.name == "weights.bin")
    assert hub_store.get_blob(w.sha256) == (hub_bundle / "weights.bin").read_bytes()
    assert got.manifest.fingerprint == rec.fingerprint
    assert [b.fingerprint for b in hub_store.list_bundles()] == [rec.fingerprint]


def test_fleets_and_devices_tokens_hashed(fleet):
    store, _ = fleet
    with pytest.raises(HubError, match="exists"):
        store.create_fleet("f", store.list_bundles()[0].fingerprint)
    with pytest.raises(HubError, match="no bundle"):
        store.create_fleet("g", "ab" * 32)
    with pytest.raises(HubError, match="invalid"):
        store.create_fleet("../x", store.list_bundles()[0].fingerprint)
    token = store.add_device("f", "d1")
    dev = store.get_device("d1")
    assert dev.token_hash == hash_token(token) and token not in dev.token_hash
    assert store.authenticate(token).id == "d1"
    assert store.authenticate(token + "x") is None
    assert store.authenticate("d2." + token.split(".", 1)[1]) is None
    assert store.authenticate("garbage") is None
    with pytest.raises(HubError, match="exists"):
        store.add_device("f", "d1")
    store.touch_device("d1")
    assert store.get_device("d1").last_seen is not None
    assert [d.id for d in store.list_devices("f")] == ["d1"]


def test_delta_idempotent_by_sha(fleet):
    store, manifest = fleet
    data = _delta(manifest, 1)
    rec = _rec(store, data)
    assert store.add_delta(rec, data) is True
    assert store.add_delta(rec, data) is False
    assert [d.id for d in store.list_deltas("f")] == [rec.id]
    assert store.delta_bytes(rec.id) == data
    with pytest.raises(HubError):
        store.add_delta(rec, data + b"x")  # id must be the bytes' sha256


def test_claim_takes_every_pending_delta_exactly_once(fleet):
    store, manifest = fleet
    ids = []
    for i in range(5):
        data = _delta(manifest, i)
        store.add_delta(_rec(store, data), data)
        ids.append(sha256_hex(data))
    v, claimed = store.claim_version("f", "default", {})
    assert v == 1 and sorted(claimed) == sorted(ids)
    assert store.claim_version("f", "default", {}) is None  # nothing pending
    assert store.list_deltas("f", pending=True) == []
    assert store.latest_version("f", "default") is None  # building is not published
    assert store.finish_version("f", "default", 1, b"merged", parent=None, report={"count": 5})
    assert not store.finish_version("f", "default", 1, b"other", parent=None, report={})  # only once
    latest = store.latest_version("f", "default")
    assert latest.version == 1 and latest.state == PUBLISHED and store.get_blob(latest.sha256) == b"merged"
    assert sorted(d.id for d in store.list_deltas("f", "default", version=1)) == sorted(ids)


def test_concurrent_claims_never_share_a_delta(fleet):
    store, manifest = fleet
    total = 40
    results, errors = [], []

    def upload(i):
        data = _delta(manifest, 100 + i)
        store.add_delta(_rec(store, data), data)

    def claim():
        try:
            for _ in range(10):
                c = store.claim_version("f", "default", {})
                if c:
                    results.append(c)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(total)] + [threading.Thread(target=claim) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rest = store.claim_version("f", "default", {})
    if rest:
        results.append(rest)
    assert not errors
    seen = [i for _, ids in results for i in ids]
    assert len(seen) == len(set(seen)) == total
    assert sorted(v for v, _ in results) == list(range(1, len(results) + 1))


def test_publish_claim_takes_no_deltas(fleet):
    store, manifest = fleet
    data = _delta(manifest, 3)
    store.add_delta(_rec(store, data), data)
    v, ids = store.claim_version("f", "default", {"publish": "x"}, take_pending=False)
    assert (v, ids) == (1, [])
    assert len(store.list_deltas("f", pending=True)) == 1
    assert [x.version for x in store.list_versions("f", state=None)] == [1]


def test_metrics(fleet):
    store, _ = fleet
    store.add_device("f", "d1")
    assert store.add_metrics("f", "d1", {"loss": 0.5, "accuracy": 0.75}, version=2) == 2
    got = {m.name: m for m in store.list_metrics("f")}
    assert got["loss"].value == 0.5 and got["accuracy"].version == 2
    with pytest.raises(HubError):
        store.add_metrics("f", "d1", {"bad name!": 1.0})
