"""The delta file: round trip, metadata, and every bad or hostile file refused with one line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import safetensors.numpy

from edgepeft.delta import Delta, DeltaMeta, delta_from_init, load_delta, save_delta
from edgepeft.delta.format import delta_bytes, delta_from_bytes, replace_meta
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest, Slot

FP = "a" * 64


def make_manifest(fingerprint: str = FP, rank: int = 4, alpha: float = 8.0) -> Manifest:
    """Two LoRA modules (in 32, out 16), a bias on one, and a 3-way head."""
    slots = []
    for m in ("enc.q", "enc.v"):
        slots += [
            Slot(f"{m}.lora_A", "lora_A", m, (rank, 32), rank=rank, alpha=alpha, init="kaiming_uniform"),
            Slot(f"{m}.lora_B", "lora_B", m, (16, rank), rank=rank, alpha=alpha),
        ]
    slots += [Slot("enc.q.bias", "bias", "enc.q", (16,)), Slot("head.weight", "weight", "head", (3, 32)), Slot("head.bias", "bias", "head", (3,))]
    return Manifest(
        fingerprint=fingerprint, source="tiny", architecture="Tiny", model_type="bert", task="sequence-classification",
        method="lora+bitfit", quantization="none", max_length=16, vocab_size=100, pad_token_id=0, slots=tuple(slots), graphs={},
    )


def make_delta(seed: int = 0, manifest: Manifest | None = None) -> Delta:
    """A delta for ``manifest`` with every tensor random (B too, so products are non-zero)."""
    manifest = manifest or make_manifest()
    d = delta_from_init(manifest, seed)
    rng = np.random.default_rng(seed + 1)
    return Delta({k: rng.standard_normal(v.shape).astype(np.float32) for k, v in d.tensors.items()}, replace_meta(d, samples=10).meta)


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def refused(tmp_path, data: bytes, manifest: Manifest | None = None, **kw) -> str:
    """Write ``data`` as bad.delta, load it, return the one-line DeltaError message."""
    p = tmp_path / "bad.delta"
    p.write_bytes(data)
    with pytest.raises(DeltaError) as e:
        load_delta(p, manifest, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("bad.delta: ")
    return msg


# ---- round trip ---------------------------------------------------------------------------------

def test_save_then_load_returns_same_tensors_and_meta(tmp_path):
    d = make_delta()
    d.meta.parent, d.meta.version, d.meta.extra = 3, 4, {"loss": "0.5"}
    save_delta(tmp_path / "x.delta", d)
    back = load_delta(tmp_path / "x.delta", make_manifest(), for_training=True)
    assert back.meta == d.meta
    assert set(back.tensors) == set(d.tensors)
    for k in d.tensors:
        np.testing.assert_array_equal(back.tensors[k], d.tensors[k])


def test_metadata_holds_format_slots_and_checksum(tmp_path):
    save_delta(tmp_path / "x.delta", make_delta())
    header, _ = split((tmp_path / "x.delta").read_bytes())
    md = header["__metadata__"]
    assert md["format"] == "edgepeft-delta" and md["format_version"] == "1"
    assert json.loads(md["slots"]) == sorted(s.name for s in make_manifest().slots)
    assert len(md["checksum"]) == 64 and md["base_fingerprint"] == FP and md["rank"] == "4"


def fixed_delta() -> Delta:
    """make_delta with a fixed creation time: the same delta whenever it is made."""
    return replace_meta(make_delta(), created="2026-01-01T00:00:00+00:00")


def test_the_same_delta_gives_the_same_bytes_in_every_process(tmp_path):
    script = ("import hashlib, sys; sys.path.insert(0, 'tests'); from test_delta_format import fixed_delta; "
              "from edgepeft.delta.format import delta_bytes; print(hashlib.sha256(delta_bytes(fixed_delta())).hexdigest())")
    here = {hashlib.sha256(delta_bytes(fixed_delta())).hexdigest() for _ in range(5)}
    other = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
             for _ in range(2)}
    assert len(here) == 1 and other == here  # safetensors alone writes its metadata in a different order each time
    save_delta(tmp_path / "x.delta", fixed_delta())
    assert load_delta(tmp_path / "x.delta", make_manifest(), for_training=True).meta == fixed_delta().meta


def test_scale_is_alpha_over_rank_and_one_without_rank():
    assert make_delta().scale == 2.0
    assert DeltaMeta(base_fingerprint=FP, rank=0, alpha=5.0).scale == 1.0


def test_delta_from_init_is_seeded_and_fits_bundle_for_training(tmp_path):
    m = make_manifest()
    a, b = delta_from_init(m, 7), delta_from_init(m, 7)
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not np.array_equal(a.tensors["enc.q.lora_A"], delta_from_init(m, 8).tensors["enc.q.lora_A"])
    save_delta(tmp_path / "i.delta", a)
    load_delta(tmp_path / "i.delta", m, for_training=True)


def test_delta_from_init_has_kaiming_a_and_zero_rest():
    d = delta_from_init(make_manifest(), 0)
    bound = 1 / np.sqrt(32)
    a = d.tensors["enc.q.lora_A"]
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert not d.tensors["enc.q.lora_B"].any() and not d.tensors["head.weight"].any() and not d.tensors["enc.q.bias"].any()
    assert (d.meta.rank, d.meta.alpha) == (4, 8.0)


def test_delta_from_init_refuses_slots_with_different_ranks():
    m = make_manifest()
    slots = list(m.slots)
    slots[0] = Slot("enc.q.lora_A", "lora_A", "enc.q", (2, 32), rank=2, alpha=8.0)
    with pytest.raises(DeltaError, match="disagree"):
        delta_from_init(dataclasses.replace(m, slots=tuple(slots)), 0)


def test_save_refuses_nan(tmp_path):
    d = make_delta()
    d.tensors["enc.q.bias"][0] = np.nan
    with pytest.raises(DeltaError, match="non-finite"):
        save_delta(tmp_path / "x.delta", d)
    assert not (tmp_path / "x.delta").exists()


def test_load_without_manifest_checks_structure_only(tmp_path):
    save_delta(tmp_path / "x.delta", make_delta())
    assert load_delta(tmp_path / "x.delta").meta.base_fingerprint == FP


# ---- refused: not a delta -----------------------------------------------------------------------

def test_missing_file_refused(tmp_path):
    with pytest.raises(DeltaError, match="no such delta file"):
        load_delta(tmp_path / "nope.delta")


def test_random_bytes_refused(tmp_path):
    assert "header length" in refused(tmp_path, np.random.default_rng(0).bytes(1000))


def test_file_shorter_than_length_field_refused(tmp_path):
    assert "truncated" in refused(tmp_path, b"\x01\x02")


def test_truncated_file_refused(tmp_path):
    data = delta_bytes(make_delta())
    assert "outside" in refused(tmp_path, data[:-10])
    assert "truncated" in refused(tmp_path, data[:30])


def test_header_not_json_refused(tmp_path):
    assert "not valid JSON" in refused(tmp_path, struct.pack("<Q", 4) + b"{{{{")


def test_header_claiming_huge_tensor_refused_without_allocating(tmp_path):
    n = 2**39
    header = {"x.bias": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}, "__metadata__": {"format": "edgepeft-delta"}}
    tracemalloc.start()
    try:
        msg = refused(tmp_path, join(header, b"\0" * 16))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "outside" in msg and peak < 1_000_000


def test_header_length_over_cap_refused(tmp_path):
    assert "cap" in refused(tmp_path, struct.pack("<Q", 2**40) + b"{}")


def test_lying_offsets_refused(tmp_path):
    header, body = split(delta_bytes(make_delta()))
    header["enc.q.bias"]["data_offsets"][1] += 4
    assert "shape (16,)" in refused(tmp_path, join(header, body))


def test_overlapping_tensors_refused(tmp_path):
    header = {
        "a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b.bias": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    assert "overlaps" in refused(tmp_path, join(header, b"\0" * 24))


def test_hole_in_buffer_refused(tmp_path):
    header = {
        "a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b.bias": {"dtype": "F32", "shape": [4], "data_offsets": [20, 36]},
    }
    assert "hole" in refused(tmp_path, join(header, b"\0" * 36))


def test_trailing_bytes_refused(tmp_path):
    assert "no tensor covers" in refused(tmp_path, delta_bytes(make_delta()) + b"\0\0\0\0")


def test_duplicate_tensor_names_refused(tmp_path):
    rec = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    h = ('{"a.bias": ' + rec + ', "a.bias": ' + rec + "}").encode()
    assert "duplicate" in refused(tmp_path, struct.pack("<Q", len(h)) + h + b"\0" * 4)


def test_non_float32_dtype_refused(tmp_path):
    d = make_delta()
    data = safetensors.numpy.save({k: v.astype(np.float16) for k, v in d.tensors.items()}, metadata={"format": "edgepeft-delta"})
    assert "dtype 'F16'" in refused(tmp_path, data)


@pytest.mark.parametrize("name", ["../evil.bias", "a/b.bias", "a\\b.bias", "a\nb.bias"])
def test_names_with_path_separators_refused(tmp_path, name):
    d = make_delta()
    d.tensors[name] = np.zeros(3, np.float32)
    assert "not allowed" in refused(tmp_path, delta_bytes(d))


def test_wrong_format_name_refused(tmp_path):
    d = make_delta()
    data = safetensors.numpy.save(d.tensors, metadata={"format": "pt"})
    assert "not an edgepeft-delta file" in refused(tmp_path, data)


def test_newer_format_version_refused(tmp_path):
    header, body = split(delta_bytes(make_delta()))
    header["__metadata__"]["format_version"] = "2"
    assert "format version '2'" in refused(tmp_path, join(header, body))


def test_bad_meta_number_refused(tmp_path):
    header, body = split(delta_bytes(make_delta()))
    header["__metadata__"]["samples"] = "-3"
    assert "'samples'" in refused(tmp_path, join(header, body))


def test_slot_list_not_matching_tensors_refused(tmp_path):
    header, body = split(delta_bytes(make_delta()))
    header["__metadata__"]["slots"] = json.dumps(["enc.q.bias"])
    assert "'slots'" in refused(tmp_path, join(header, body))


def test_flipped_data_byte_fails_checksum(tmp_path):
    data = bytearray(delta_bytes(make_delta()))
    data[-1] ^= 1
    assert "checksum" in refused(tmp_path, bytes(data))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_refused(tmp_path, value):
    d = make_delta()
    d.tensors["head.weight"][1, 2] = value
    assert "non-finite" in refused(tmp_path, delta_bytes(d))


def test_lora_rank_mismatch_between_a_and_b_refused(tmp_path):
    d = make_delta()
    d.tensors["enc.q.lora_B"] = d.tensors["enc.q.lora_B"][:, :3].copy()
    assert "lora_A has rank 4 but lora_B has rank 3" in refused(tmp_path, delta_bytes(d))


def test_lora_without_partner_refused(tmp_path):
    d = make_delta()
    del d.tensors["enc.q.lora_B"]
    assert "no partner" in refused(tmp_path, delta_bytes(d))


# ---- refused: does not fit the bundle -----------------------------------------------------------

def test_delta_for_another_base_refused(tmp_path):
    msg = refused(tmp_path, delta_bytes(make_delta()), make_manifest("b" * 64))
    assert f"delta is for base {'a' * 16}, bundle is {'b' * 16}" in msg


def test_missing_slot_named(tmp_path):
    d = make_delta()
    del d.tensors["head.bias"]
    assert "missing head.bias" in refused(tmp_path, delta_bytes(d), make_manifest())


def test_extra_slot_named(tmp_path):
    d = make_delta()
    d.tensors["enc.k.bias"] = np.zeros(16, np.float32)
    assert "extra enc.k.bias" in refused(tmp_path, delta_bytes(d), make_manifest())


def test_wrong_lora_shape_refused_with_needed_shape(tmp_path):
    d = make_delta()
    d.tensors["enc.q.lora_A"] = d.tensors["enc.q.lora_A"][:, :31].copy()
    msg = refused(tmp_path, delta_bytes(d), make_manifest())
    assert msg == "bad.delta: tensor 'enc.q.lora_A' has shape (4, 31), bundle slot needs (r, 32)"


def test_wrong_bias_shape_refused(tmp_path):
    d = make_delta()
    d.tensors["head.bias"] = np.zeros(4, np.float32)
    assert "tensor 'head.bias' has shape (4,), bundle slot needs (3,)" in refused(tmp_path, delta_bytes(d), make_manifest())


def test_a_lower_rank_loads_for_training_and_a_higher_one_only_for_inference(tmp_path):
    # a lower rank trains on the bundle's graph zero-padded (delta/ranks.py); a higher one cannot
    m2 = make_manifest(rank=2)
    d = replace_meta(make_delta(manifest=m2), rank=2)
    (tmp_path / "r2.delta").write_bytes(delta_bytes(d))
    assert load_delta(tmp_path / "r2.delta", make_manifest(), for_training=True).meta.rank == 2
    m8 = make_manifest(rank=8)
    d8 = replace_meta(make_delta(manifest=m8), rank=8)
    (tmp_path / "r8.delta").write_bytes(delta_bytes(d8))
    assert load_delta(tmp_path / "r8.delta", make_manifest()).meta.rank == 8
    msg = refused(tmp_path, delta_bytes(d8), make_manifest(), for_training=True)
    assert "has shape (8, 32), bundle slot needs (4, 32) to train (rank at most 4)" in msg


# ---- fuzz ---------------------------------------------------------------------------------------

def test_fuzzed_files_give_a_delta_or_a_delta_error():
    valid = delta_bytes(make_delta())
    rng = np.random.default_rng(1234)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(300):
        data = bytearray(valid)
        op = i % 4
        if op == 0:  # flip a few bytes anywhere
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                data[pos] = int(rng.integers(0, 256))
        elif op == 1:  # truncate
            data = data[: int(rng.integers(0, len(data)))]
        elif op == 2:  # mutate the header only
            (n,) = struct.unpack("<Q", data[:8])
            for pos in rng.integers(8, 8 + n, size=int(rng.integers(1, 4))):
                data[pos] = int(rng.integers(32, 127))
        else:  # splice random bytes in
            pos = int(rng.integers(0, len(data)))
            data[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
        try:
            delta_from_bytes(bytes(data), "fuzz", make_manifest())
            outcomes["ok"] += 1
        except DeltaError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 250


def test_memory_mapped_reader_accepts_and_refuses_exactly_what_the_reader_does(tmp_path):
    from edgepeft.delta import map_delta

    valid = delta_bytes(make_delta())
    rng = np.random.default_rng(99)
    for i in range(60):
        data = bytearray(valid)
        if i % 2:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for pos in rng.integers(0, len(data), size=3):
                data[pos] = int(rng.integers(0, 256))
        (tmp_path / "f.delta").write_bytes(bytes(data))
        outcome = []
        for read in (load_delta, map_delta):
            try:
                d = read(tmp_path / "f.delta", make_manifest())
                outcome.append(sorted((k, v.tobytes()) for k, v in d.tensors.items()))
            except DeltaError as e:
                outcome.append(str(e))
        assert outcome[0] == outcome[1]
    (tmp_path / "f.delta").write_bytes(valid)
    mapped = map_delta(tmp_path / "f.delta", make_manifest())
    assert all(not t.flags.writeable and not t.flags.owndata for t in mapped.tensors.values())


# ---- ONNX Runtime adapter export ----------------------------------------------------------------

def test_ort_adapter_holds_slots_with_b_scaled(tmp_path):
    import onnxruntime

    from edgepeft.delta.ort_adapter import model_version, to_ort_adapter

    d = make_delta()
    d.meta.version = 7
    to_ort_adapter(d, tmp_path / "x.onnx_adapter")
    fmt = onnxruntime.AdapterFormat.read_adapter(str(tmp_path / "x.onnx_adapter"))
    assert fmt.get_adapter_version() == 7 and fmt.get_model_version() == model_version(FP)
    params = {k: v.numpy() for k, v in fmt.get_parameters().items()}
    assert set(params) == set(d.tensors)
    np.testing.assert_array_equal(params["enc.q.lora_A"], d.tensors["enc.q.lora_A"])
    np.testing.assert_allclose(params["enc.q.lora_B"], d.tensors["enc.q.lora_B"] * d.scale, rtol=1e-7)
    np.testing.assert_array_equal(params["head.weight"], d.tensors["head.weight"])
