"""The chunked merge (hub/stream_merge.py, hub/delta_chunks.py) against the per-delta merge it replaces: the same
version and report on random deltas of mixed ranks, stale parents, raw and packed blobs, for every non-trimmed option."""

from __future__ import annotations

import numpy as np
import pytest

from edgepeft.delta.format import Delta, delta_bytes, delta_from_init, replace_meta
from edgepeft.delta.merge import diff
from edgepeft.delta.transport import pack, unpack
from edgepeft.errors import DeltaError
from edgepeft.hub import aggregate as agg
from edgepeft.hub import delta_chunks, stream_merge
from edgepeft.hub.backends import open_store
from edgepeft.hub.robust import RobustOptions
from edgepeft.hub.store import DeltaRec, sha256_hex
from edgepeft.manifest import read_manifest

OPTIONS = {
    "plain mean": {"clip_median": None, "trim": 0.0},
    "median clipping": {"clip_median": 1.0, "trim": 0.0},
    "fixed clipping, capped samples": {"clip_norm": 0.3, "trim": 0.0, "max_samples": 20},
    "server step": {"clip_median": 0.5, "trim": 0.0, "server_lr": 0.7, "server_momentum": 0.9},
}


def device_delta(manifest, seed: int, rank: int, parent: int | None) -> Delta:
    """Random factors at ``rank`` (the bundle's 4, or a lower one), bias and head; samples 1..50."""
    rng = np.random.default_rng(seed)
    d = delta_from_init(manifest, seed)
    tensors = {}
    for s in manifest.slots:
        shape = (rank, s.shape[1]) if s.kind == "lora_A" else (s.shape[0], rank) if s.kind == "lora_B" else s.shape
        tensors[s.name] = (rng.standard_normal(shape) * rng.uniform(0.02, 0.3)).astype(np.float32)
    d = Delta(tensors, d.meta)
    return replace_meta(d, rank=rank, alpha=2.0 * rank, samples=int(rng.integers(1, 50)), parent=parent,
                        creator=f"d{seed % 7}")


def add(store, d: Delta, data: bytes) -> None:
    store.add_delta(DeltaRec(sha256_hex(data), "f", d.meta.creator, "default", d.meta.parent or 0, d.meta.samples,
                             len(data), 0.0), data)


@pytest.fixture
def fleet(tmp_path, hub_bundle):
    """A fleet taking ranks 2 and 4, versions 1 and 2 published, 37 deltas pending: trained from v1 and v2 (stale and
    fresh) and from none, at both ranks, one in three stored raw, the rest packed."""
    store = open_store(str(tmp_path / "store"))
    files = {p.name: p.read_bytes() for p in hub_bundle.iterdir()}
    rec, _ = store.add_bundle(files["manifest.json"].decode(), files)
    store.create_fleet("f", rec.fingerprint, staleness=3, ranks=(2, 4))
    manifest = read_manifest(hub_bundle)
    for v in (1, 2):
        agg.publish(store, "f", "default", delta_bytes(device_delta(manifest, 1000 + v, 4, v - 1 or None)))
    for i in range(37):
        d = device_delta(manifest, i, (2, 4)[i % 2], (None, 1, 2)[i % 3])
        add(store, d, delta_bytes(d) if i % 3 == 0 else pack(d))
    yield store, manifest
    store.close()


def both(store, manifest, options: dict, monkeypatch, threads: int = 2) -> tuple[tuple, tuple]:
    """(version, report) by the per-delta merge and by the chunked one (chunks of 5: several per rank; the modules
    on ``threads`` threads)."""
    opts = RobustOptions.from_dict(options)
    version, _ = store.claim_version("f", "default", opts.to_dict())
    claimed = store.list_deltas("f", "default", version=version)
    parents = agg._Parents(store, "f", "default", manifest)
    old = agg._merge_per_delta(store, claimed, 2, manifest, opts, parents, None, 1)
    monkeypatch.setattr(delta_chunks, "CHUNK", 5)
    monkeypatch.setattr(agg, "MERGE_THREADS", threads)
    new = agg._merge_chunked(store, claimed, 2, manifest, opts, parents, 1)
    return old, new


def assert_same(old_pair: tuple, new_pair: tuple) -> None:
    """The chunked merge's version and report are the per-delta merge's (ΔW to 1e-5, norms to 1e-9)."""
    (old, old_report), (new, new_report) = old_pair, new_pair
    for key, (max_abs, rel) in diff(new, old).items():
        if ":dW" in key or "lora" not in key:  # factors are defined up to an r x r mixing; ΔW is what counts
            assert rel < 1e-5, (key, max_abs, rel)
    assert new.meta.samples == old.meta.samples and new.meta.rank == old.meta.rank == 4
    assert set(new_report) == set(old_report) | {"reread"}  # how many deltas the median bound read twice
    for k in {"count", "samples", "stale", "max_staleness", "clipped", "trimmed"} & set(old_report):
        assert new_report[k] == old_report[k], k
    for k in {"total_weight", "clip_bound", "max_update_norm"} & set(old_report):
        assert new_report[k] == pytest.approx(old_report[k], rel=1e-9), k


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_the_chunked_merge_makes_the_per_delta_merges_version(fleet, options, threads, monkeypatch):
    store, manifest = fleet
    assert stream_merge.eligible(manifest)
    assert_same(*both(store, manifest, options, monkeypatch, threads))


def median_fleet(tmp_path, hub_bundle, sizes: list[float]) -> tuple:
    """A fleet of ranks 2 and 4 with v1 published and one pending delta per entry of ``sizes``, in that arrival order:
    trained from v1 (or from none), its factors drawn at that scale (0: a first-round delta of zeros, no update; a
    delta equal to its parent is no update either, but its norm from Gram matrices is a rounding residue, not 0)."""
    store = open_store(str(tmp_path / "store"))
    files = {p.name: p.read_bytes() for p in hub_bundle.iterdir()}
    rec, _ = store.add_bundle(files["manifest.json"].decode(), files)
    store.create_fleet("f", rec.fingerprint, staleness=3, ranks=(2, 4))
    manifest = read_manifest(hub_bundle)
    agg.publish(store, "f", "default", delta_bytes(device_delta(manifest, 999, 4, None)))
    agg.publish(store, "f", "default", delta_bytes(device_delta(manifest, 1000, 4, None)))  # v2: deltas 1 behind
    for i, size in enumerate(sizes):
        d = device_delta(manifest, i, (2, 4)[i % 2] if i % 3 else 4, (None, 1)[i % 2] if size else None)
        d = Delta({k: v * np.float32(size) for k, v in d.tensors.items()}, d.meta)
        data = pack(d) if i % 4 and size else delta_bytes(d)
        store.add_delta(DeltaRec(sha256_hex(data), "f", d.meta.creator, "default", d.meta.parent or 0, d.meta.samples,
                                 len(data), float(i)), data)  # claimed in this order
    return store, manifest


def test_the_median_bound_in_one_pass_when_the_first_chunk_misjudges_it(tmp_path, hub_bundle, monkeypatch):
    """The first chunks (5 deltas of one layout) come from 20 deltas 20x larger than the 40 after them: their
    threshold puts the next deltas below it, and those above the round's bound are read again and corrected; the
    version is the per-delta merge's."""
    store, manifest = median_fleet(tmp_path, hub_bundle, [20.0] * 20 + [1.0] * 40)
    old, new = both(store, manifest, {"clip_median": 0.5, "trim": 0.0}, monkeypatch)
    assert_same(old, new)
    assert new[1]["reread"] > 0 and new[1]["passes"] == 2
    store.close()


@pytest.mark.parametrize("options", [{"trim": 0.0}, {"buckets": 5}], ids=["median clipping", "the defaults, 5 buckets"])
def test_a_median_update_norm_of_0_clips_nothing(tmp_path, hub_bundle, monkeypatch, options):
    """Most deltas are their parent version (update 0): the median is 0, so no bound; the deltas the threshold put
    above it get their full weight back."""
    store, manifest = median_fleet(tmp_path, hub_bundle, [1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    old, new = both(store, manifest, options, monkeypatch)
    assert_same(old, new)
    assert "clip_bound" not in new[1] and new[1]["reread"] > 0
    store.close()


def test_merge_memory_is_flat_in_the_number_of_deltas(tmp_path, hub_bundle, monkeypatch):
    """The chunked merge's Python-heap peak (numpy's arrays included) for 200 deltas is that for 40 plus some
    bookkeeping per delta (ids, weights, norms: under 1 KB), never a delta's tensors: a chunk's memory and the bucket
    sums, not the count's (the defaults: median clipping, trimmed over 8 buckets)."""
    import tracemalloc

    store, manifest = median_fleet(tmp_path, hub_bundle, [1.0 + (i % 5) for i in range(200)])
    opts = RobustOptions.from_dict({"buckets": 8})
    monkeypatch.setattr(delta_chunks, "CHUNK", 5)
    version, _ = store.claim_version("f", "default", opts.to_dict())
    claimed = store.list_deltas("f", "default", version=version)
    parents = agg._Parents(store, "f", "default", manifest)
    peaks = {}
    for n in (40, 200):
        agg._merge_chunked(store, claimed[:n], 2, manifest, opts, parents, 1)  # warm: layouts, parents, imports
        tracemalloc.start()
        agg._merge_chunked(store, claimed[:n], 2, manifest, opts, parents, 1)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    one = len(delta_bytes(agg.parse_delta(store.get_blob(claimed[0].id), "d", manifest)))  # a delta's float32 tensors
    assert (peaks[200] - peaks[40]) / 160 < min(1024, one / 2), (peaks, one)
    store.close()


TRIMMED = {
    "trimmed mean": {"clip_median": None, "trim": 0.2},
    "the defaults": {},
    "trimmed, server step": {"trim": 0.3, "server_lr": 0.7, "server_momentum": 0.9},
}


@pytest.mark.parametrize("options", TRIMMED.values(), ids=TRIMMED.keys())
def test_buckets_of_one_delta_make_the_per_delta_trimmed_mean(fleet, options, monkeypatch):
    """B >= n: every delta a bucket of its own; the chunked path's version is the per-delta trimmed mean's."""
    assert_same_trimmed(*fleet, {**options, "buckets": 40}, monkeypatch,
                        {"over": "deltas", "buckets": 37, "deltas_per_bucket": [1, 1], "cut_each_end": int(37 * options.get("trim", 0.2))})


@pytest.mark.parametrize("options", TRIMMED.values(), ids=TRIMMED.keys())
def test_the_chunked_bucket_means_are_the_per_delta_bucket_means(fleet, options, monkeypatch):
    """B < n: the chunked path and the one-delta-at-a-time path (methods such as DoRA) bucket and trim alike."""
    assert_same_trimmed(*fleet, {**options, "buckets": 8}, monkeypatch,
                        {"over": "buckets", "buckets": 8, "deltas_per_bucket": [4, 5], "cut_each_end": int(8 * options.get("trim", 0.2))})


def assert_same_trimmed(store, manifest, options: dict, monkeypatch, trimmed: dict) -> None:
    (old, old_report), (new, new_report) = both(store, manifest, options, monkeypatch)
    assert set(new_report) == set(old_report) | {"reread"}
    assert new_report["trimmed"] == old_report["trimmed"] == trimmed
    for key, (max_abs, rel) in diff(new, old).items():
        if ":dW" in key or "lora" not in key:
            assert rel < 1e-5, (key, max_abs, rel)
    assert new.meta.samples == old.meta.samples
    for k in {"count", "samples", "stale", "max_staleness", "clipped"} & set(old_report):
        assert new_report[k] == old_report[k], k


def test_every_bundle_of_lora_and_plain_slots_takes_the_chunked_path_whatever_the_options(hub_bundle):
    manifest = read_manifest(hub_bundle)
    assert stream_merge.eligible(manifest)


def test_a_chunk_holds_exactly_what_the_device_reader_reads(hub_bundle):
    manifest = read_manifest(hub_bundle)
    deltas = [device_delta(manifest, i, 4, None) for i in range(3)]
    blobs = [pack(d) for d in deltas]
    (chunk,) = delta_chunks.chunks([(sha256_hex(b), b) for b in blobs], manifest)
    for name in deltas[0].tensors:
        want = np.stack([unpack(b, manifest=manifest, for_training=True).tensors[name] for b in blobs])
        np.testing.assert_array_equal(chunk.values(name), want)


def test_a_stored_delta_holding_code_minus_128_is_refused_by_name(hub_bundle):
    manifest = read_manifest(hub_bundle)
    good = pack(device_delta(manifest, 1, 4, None))
    data = bytearray(pack(device_delta(manifest, 2, 4, None)))
    from edgepeft.delta.transport import MAGIC, zstd

    payload = bytearray(zstd.decompress(bytes(data[len(MAGIC):])))
    payload[-1] = 0x80  # the last code of the last tensor: -128
    bad = MAGIC + zstd.compress(bytes(payload), options={zstd.CompressionParameter.checksum_flag: 1,
                                                          zstd.CompressionParameter.content_size_flag: 1})
    with pytest.raises(DeltaError, match="-128") as reader:
        unpack(bad, manifest=manifest, for_training=True)
    (chunk,) = delta_chunks.chunks([("a" * 64, good), ("b" * 64, bad)], manifest)
    last = reader.value.args[0].split("'")[1]  # the tensor the reader names
    with pytest.raises(DeltaError, match=f"delta bbbbbbbbbbbbbbbb: tensor '{last}' holds -128"):
        chunk.values(last)


def test_a_stored_delta_the_reader_refuses_stops_the_merge_with_its_name(hub_bundle):
    """The chunks are read in a thread: what it refuses is raised to the merge, and the thread ends."""
    import threading

    manifest = read_manifest(hub_bundle)
    good = pack(device_delta(manifest, 1, 4, None))
    reading = delta_chunks.chunks([("a" * 64, good), ("c" * 64, good[:-9])], manifest)
    with pytest.raises(DeltaError, match="delta cccccccccccccccc: "):
        list(reading)
    assert not any(t.name == "delta-chunks" and t.is_alive() for t in threading.enumerate())
