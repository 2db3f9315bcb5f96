"""The hub checks a packed upload from its int8 codes (hub/packed_check.py): it refuses exactly what the device reader
(transport.unpack, for training, against the bundle) refuses, and for the rest finds the reader's largest |value| and
the same content id, without dequantizing."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
from test_delta_transport import FP, make_delta, make_manifest, payload_of, repack

from edgepeft.delta import Delta, DeltaMeta, pack, unpack
from edgepeft.errors import DeltaError
from edgepeft.hub import limits
from edgepeft.hub.packed_check import check_packed
from edgepeft.manifest import Slot


def _reader(data: bytes, manifest):
    """What the hub concluded from the dequantized delta: (meta, largest |x|, content id), or the reader's error."""
    codes: dict = {}
    d = unpack(data, "up", manifest=manifest, for_training=True, codes=codes)
    return d.meta, limits.largest_value(d), limits.content_id(d, "dev-1", codes)


def _fast(data: bytes, manifest):
    c = check_packed(data, "up", manifest)
    return c.meta, c.largest, limits.codes_content_id(c.meta, c.shapes, c.codes, "dev-1")


def _agree(data: bytes, manifest) -> bool:
    """True if both accepted with the same conclusions; False if both refused; fails the test if they differ."""
    try:
        want = _reader(data, manifest)
    except DeltaError:
        with pytest.raises(DeltaError):
            _fast(data, manifest)
        return False
    assert _fast(data, manifest) == want
    return True


def test_an_honest_packed_delta_gives_the_readers_largest_value_and_content_id():
    m = make_manifest()
    for seed in range(5):
        assert _agree(pack(make_delta(seed)), m)


def test_the_content_id_is_the_one_a_raw_upload_of_the_same_delta_gets():
    d = make_delta(1)
    c = check_packed(pack(d), "up", make_manifest())
    assert limits.codes_content_id(c.meta, c.shapes, c.codes, "dev-1") == limits.content_id(d, "dev-1")


def _one_bias():
    """A bundle of one 4-wide bias slot: one row, one scale, four codes."""
    return dataclasses.replace(make_manifest(), method="bitfit", slots=(Slot("m.bias", "bias", "m", (4,)),))


def _single_row(scale: float, codes: bytes) -> bytes:
    d = Delta({"m.bias": np.ones(4, np.float32)}, DeltaMeta(base_fingerprint=FP))
    p = bytearray(payload_of(pack(d)))
    p[-8:-4] = struct.pack("<f", scale)
    p[-4:] = codes
    return repack(bytes(p))


@pytest.mark.parametrize("scale, codes, says", [
    (float("nan"), b"\x01\x01\x01\x01", "row scale"),
    (-1.0, b"\x01\x01\x01\x01", "row scale"),
    (float("inf"), b"\x01\x01\x01\x01", "row scale"),
    (1.0, b"\x01\x80\x01\x01", "-128"),
    (3e38, b"\x7f\x01\x01\x01", "non-finite"),  # finite scale, but 127 * 3e38 overflows float32 as dequantize computes it
])
def test_a_hostile_row_is_refused_as_the_reader_refuses_it(scale, codes, says):
    m = _one_bias()
    data = _single_row(scale, codes)
    with pytest.raises(DeltaError, match=says):
        check_packed(data, "up", m)
    with pytest.raises(DeltaError):
        unpack(data, "up", manifest=m, for_training=True)


def test_the_largest_value_is_the_float32_product_dequantize_computes():
    m = _one_bias()
    for scale in (1e-3, 0.1, 1.0 / 3.0, 78.7401, 2.6e36):
        assert _agree(_single_row(scale, b"\x7f\x05\x81\x00"), m)


def test_fuzzed_packed_uploads_are_refused_or_accepted_exactly_as_the_reader_does():
    m = make_manifest()
    valid = pack(make_delta(2))
    inner = payload_of(valid)
    rng = np.random.default_rng(7)
    accepted = 0
    for i in range(300):
        p = bytearray(inner)
        # the header (first ~600 bytes), then anywhere: scales and codes
        for pos in rng.integers(0, min(len(p), 600) if i % 2 else len(p), size=int(rng.integers(1, 4))):
            p[pos] = int(rng.integers(0, 256))
        accepted += _agree(repack(bytes(p)), m)
    assert 0 < accepted < 300  # both outcomes were exercised


def test_a_header_equal_to_the_last_one_but_with_a_float_or_bool_dimension_is_refused_as_the_reader_refuses_it():
    """The check remembers the last delta's tensor list; 384.0 == 384 and True == 1 in Python, but the reader refuses
    both, so a list equal to the remembered one in value but not in type must not take that shortcut."""
    import json

    m = make_manifest()
    honest = pack(make_delta(2))
    assert _agree(honest, m)  # the remembered list is now this one
    payload = payload_of(honest)
    (n,) = struct.unpack("<I", payload[:4])
    header = json.loads(payload[4:4 + n])
    for odd in (float, lambda d: True if d == 1 else float(d)):
        h = json.loads(json.dumps(header))
        h["tensors"][0][1][0] = odd(h["tensors"][0][1][0])
        text = json.dumps(h).encode()
        assert h["tensors"] == header["tensors"]  # equal in value to the remembered list
        assert not _agree(repack(struct.pack("<I", len(text)) + text + payload[4 + n:]), m)
        assert _agree(honest, m)
