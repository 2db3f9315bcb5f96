"""The transport form: int8 per row + zstd. Error bound, size, and strict parsing of packed bytes."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edgepeft.delta import Delta, DeltaMeta, pack, unpack
from edgepeft.delta import transport
from edgepeft.delta.format import delta_bytes
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest, Slot

FP = "c" * 64


def make_manifest(fingerprint: str = FP) -> Manifest:
    slots = (
        Slot("m.lora_A", "lora_A", "m", (8, 64), rank=8, alpha=16.0),
        Slot("m.lora_B", "lora_B", "m", (48, 8), rank=8, alpha=16.0),
        Slot("m.bias", "bias", "m", (48,)),
        Slot("head.weight", "weight", "head", (5, 64)),
    )
    return Manifest(
        fingerprint=fingerprint, source="tiny", architecture="Tiny", model_type="bert", task="sequence-classification",
        method="lora+bitfit", quantization="none", max_length=16, vocab_size=100, pad_token_id=0, slots=slots, graphs={},
    )


def make_delta(seed: int = 0) -> Delta:
    """Rows of very different magnitudes, one all-zero row, so per-row scales matter."""
    rng = np.random.default_rng(seed)
    t = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in make_manifest().slots}
    t["m.lora_B"] *= np.logspace(-4, 2, 48, dtype=np.float32)[:, None]
    t["head.weight"][2] = 0.0
    return Delta(t, DeltaMeta(base_fingerprint=FP, method="lora+bitfit", rank=8, alpha=16.0, samples=42, creator="dev-1"))


def payload_of(data: bytes) -> bytes:
    return transport.zstd.decompress(data[len(transport.MAGIC) :])


def streamed(payload: bytes) -> bytes:
    """A zstd frame written by a streaming compressor, which does not record the content size."""
    c = transport.zstd.ZstdCompressor()
    return c.compress(payload) + c.flush()


def repack(payload: bytes) -> bytes:
    return transport.MAGIC + transport.zstd.compress(payload)


def refused(data: bytes, **kw) -> str:
    with pytest.raises(DeltaError) as e:
        unpack(data, "x.packed", **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("x.packed: ")
    return msg


def test_round_trip_keeps_meta_names_and_shapes():
    d = make_delta()
    back = unpack(pack(d), manifest=make_manifest())
    assert back.meta == d.meta
    assert {k: v.shape for k, v in back.tensors.items()} == {k: v.shape for k, v in d.tensors.items()}
    assert all(v.dtype == np.float32 for v in back.tensors.values())


def test_reconstruction_error_is_within_half_a_row_step():
    d = make_delta()
    back = unpack(pack(d))
    for name, x in d.tensors.items():
        rows = x.reshape(1, -1) if x.ndim == 1 else x
        bound = np.abs(rows).max(axis=1, keepdims=True) / 254  # = scale_row / 2
        err = np.abs(back.tensors[name].reshape(rows.shape) - rows)
        assert (err <= bound * (1 + 1e-6) + 1e-30).all(), name


def test_zero_rows_come_back_exactly_zero():
    back = unpack(pack(make_delta()))
    assert not back.tensors["head.weight"][2].any()


def test_packed_is_much_smaller_than_the_file():
    d = make_delta()
    assert len(pack(d)) < len(delta_bytes(d)) / 2.5


def test_quantize_uses_full_int8_range_per_row():
    scales, q = transport.quantize(np.array([[1.0, -0.5], [0.0, 0.0], [-3.0, 3.0]], np.float32))
    assert q[0, 0] == 127 and q[2, 0] == -127 and q[2, 1] == 127 and not q[1].any()
    np.testing.assert_allclose(scales, [1 / 127, 0, 3 / 127], rtol=1e-6)


def test_unpack_checks_the_base_when_given_a_manifest():
    assert "delta is for base" in refused(pack(make_delta()), manifest=make_manifest("d" * 64))


def test_bad_magic_refused():
    assert "bad magic" in refused(b"PK\x03\x04" + bytes(100))


def test_newer_version_refused():
    data = bytearray(pack(make_delta()))
    data[4] = 2
    assert "version 2" in refused(bytes(data))


def test_truncated_packed_refused():
    data = pack(make_delta())
    refused(data[: len(data) // 2])
    refused(data[:3])


def test_trailing_bytes_refused():
    assert "4 bytes after the zstd frame" in refused(pack(make_delta()) + b"junk")


def test_frame_bigger_than_cap_refused_before_decompressing(monkeypatch):
    monkeypatch.setattr(transport, "MAX_UNPACKED_BYTES", 1000)
    assert "declares" in refused(pack(make_delta()))


def test_frame_without_content_size_refused():
    data = transport.MAGIC + streamed(payload_of(pack(make_delta())))
    assert "declares -1 bytes" in refused(data)


def test_header_describing_more_bytes_than_payload_refused():
    p = payload_of(pack(make_delta()))
    assert "header describes" in refused(repack(p[:-1]))


def test_header_length_beyond_payload_refused():
    p = payload_of(pack(make_delta()))
    assert "does not fit" in refused(repack(struct.pack("<I", len(p)) + p[4:]))


def test_unsafe_tensor_name_refused():
    p = payload_of(pack(make_delta()))
    (n,) = struct.unpack("<I", p[:4])
    header = json.loads(p[4 : 4 + n])
    header["tensors"][0][0] = "../../etc.bias"
    h = json.dumps(header).encode()
    assert "unsafe" in refused(repack(struct.pack("<I", len(h)) + h + p[4 + n :]))


def test_non_finite_scale_refused():
    d = Delta({"m.bias": np.ones(4, np.float32)}, DeltaMeta(base_fingerprint=FP))
    p = bytearray(payload_of(pack(d)))
    p[-8:-4] = struct.pack("<f", float("nan"))  # the one row scale sits just before the 4 int8 values
    assert "row scale" in refused(repack(bytes(p)))


def test_minus_128_refused():
    d = Delta({"m.bias": np.ones(4, np.float32)}, DeltaMeta(base_fingerprint=FP))
    p = bytearray(payload_of(pack(d)))
    p[-1] = 0x80
    assert "-128" in refused(repack(bytes(p)))


def test_fuzzed_packed_bytes_give_a_delta_or_a_delta_error():
    valid = pack(make_delta())
    inner = payload_of(valid)
    rng = np.random.default_rng(99)
    for i in range(300):
        if i % 2:  # corrupt the compressed bytes
            data = bytearray(valid)
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
                data[pos] = int(rng.integers(0, 256))
            data = bytes(data[: int(rng.integers(len(data) // 2, len(data) + 1))])
        else:  # corrupt the payload and recompress, so the parser behind zstd is exercised
            p = bytearray(inner)
            for pos in rng.integers(0, min(len(p), 600), size=int(rng.integers(1, 4))):
                p[pos] = int(rng.integers(0, 256))
            data = repack(bytes(p))
        try:
            unpack(data, "fuzz")
        except DeltaError as e:
            assert "\n" not in str(e)


# ---- the stated error bound ---------------------------------------------------------------------

def test_stated_row_bound_holds_for_every_element_and_is_tight():
    d = make_delta(3)
    back = unpack(pack(d))
    worst = 0.0
    for name, x in d.tensors.items():
        rows = x.reshape(1, -1) if x.ndim == 1 else x
        bound = transport.row_error_bounds(x)[:, None]
        err = np.abs(back.tensors[name].reshape(rows.shape).astype(np.float64) - rows)
        assert (err <= bound).all(), name
        worst = max(worst, float((err / np.where(bound > 0, bound, 1)).max()))
    assert worst > 0.9  # some element really loses almost half a step: the bound is not loose
    actual = max(float(np.abs(back.tensors[n] - d.tensors[n]).max()) for n in d.tensors)
    assert actual <= transport.error_bound(d) < 1.01 * max(float(np.abs(x).max()) for x in d.tensors.values()) / 254


# ---- training resumed from a packed delta ----------------------------------------------------------

def test_training_resumed_from_packed_delta_reaches_the_same_accuracy(bundles, tmp_path):
    """Train part way, then continue once from the delta and once from pack → unpack of it: accuracy within 0.2 points."""
    from synthetic_tasks import classification_files, word_group_rows, write_jsonl

    from edgepeft.runtime.data import load_dataset
    from edgepeft.runtime.evaluate import evaluate
    from edgepeft.runtime.infer import Predictor
    from edgepeft.runtime.text import load_tokenizer
    from edgepeft.runtime.trainer import TrainConfig, Trainer

    b = bundles("bert")
    tok = load_tokenizer(b)
    train_file, _ = classification_files(tmp_path)
    train = load_dataset(train_file, b.manifest, tok)
    test = load_dataset(write_jsonl(tmp_path / "test.jsonl", word_group_rows(5000, 7)), b.manifest, tok)
    first = Trainer(b, train, TrainConfig(max_steps=12, lr=3e-2)).fit().delta
    sent = unpack(pack(first), manifest=b.manifest)
    assert 0 < max(float(np.abs(sent.tensors[k] - first.tensors[k]).max()) for k in first.tensors) <= transport.error_bound(first)
    p = Predictor(b)
    acc = {}
    for name, start in (("raw", first), ("packed", sent)):
        resumed = Trainer(b, train, TrainConfig(epochs=4, lr=3e-2, seed=1), start=start).fit().delta
        acc[name] = 100 * evaluate(p, test, [resumed])["accuracy"]
    before = 100 * evaluate(p, test, [first])["accuracy"]
    assert acc["raw"] > before + 5  # the resumed runs really learned more
    assert acc["raw"] >= 90 and abs(acc["raw"] - acc["packed"]) <= 0.2, acc
