"""Hostile delta bytes: the header is checked against the bundle before any payload is decompressed,
and the hub reads no upload larger than the biggest delta the bundle allows."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from test_delta_transport import make_delta, make_manifest

from edgepeft.delta import transport
from edgepeft.delta.format import delta_bytes, delta_from_bytes, max_file_bytes, meta_to_strings
from edgepeft.errors import DeltaError


def handmade(meta: dict[str, str], specs: list, payload: bytes) -> bytes:
    """Packed bytes with any header (what a hostile device can send)."""
    hb = json.dumps({"format": transport.PACKED_FORMAT, "meta": meta, "tensors": specs}).encode()
    return transport.MAGIC + transport.zstd.compress(struct.pack("<I", len(hb)) + hb + payload)


def specs_of(manifest, rank=None) -> list:
    out = []
    for s in sorted(manifest.slots, key=lambda s: s.name):
        shape = list(s.shape)
        if rank is not None and s.kind == "lora_A":
            shape[0] = rank
        if rank is not None and s.kind == "lora_B":
            shape[1] = rank
        out.append([s.name, shape])
    return out


def zeros_for(specs: list) -> bytes:
    return bytes(sum((1 if len(sh) == 1 else sh[0]) * 4 + int(np.prod(sh)) for _, sh in specs))


@pytest.fixture
def decompressed(monkeypatch):
    """Counts the content bytes the reader asks the decompressor for."""
    count = {"bytes": 0}
    real = transport.Frame.read

    def read(self, n):
        count["bytes"] += n
        return real(self, n)

    monkeypatch.setattr(transport.Frame, "read", read)
    return count


def test_a_packed_delta_of_another_rank_is_refused_before_its_payload_is_decompressed(decompressed):
    manifest = make_manifest()
    meta = dict(meta_to_strings(make_delta().meta), rank="4096")
    specs = specs_of(manifest, rank=4096)
    data = handmade(meta, specs, zeros_for(specs))
    with pytest.raises(DeltaError, match="lora_A.*needs \\(8, 64\\) to train"):
        transport.unpack(data, "up", manifest=manifest, for_training=True)
    assert decompressed["bytes"] < 4096  # the header only, not the ~600 KB payload it declares


def test_a_slot_the_bundle_lacks_is_refused_before_its_payload_is_decompressed(decompressed):
    manifest = make_manifest()
    specs = specs_of(manifest) + [["evil.lora_A", [8, 1 << 20]]]
    data = handmade(meta_to_strings(make_delta().meta), specs, zeros_for(specs))
    with pytest.raises(DeltaError, match="extra evil.lora_A"):
        transport.unpack(data, "up", manifest=manifest)
    assert decompressed["bytes"] < 4096


def test_a_frame_holding_more_than_its_header_describes_is_refused_before_the_payload(decompressed):
    manifest = make_manifest()
    specs = specs_of(manifest)
    data = handmade(meta_to_strings(make_delta().meta), specs, zeros_for(specs) + bytes(1 << 24))
    with pytest.raises(DeltaError, match="header describes"):
        transport.unpack(data, "up", manifest=manifest)
    assert decompressed["bytes"] < 4096


def test_a_header_larger_than_the_bundle_needs_is_refused_unparsed():
    manifest = make_manifest()
    meta = dict(meta_to_strings(make_delta().meta), extra=json.dumps({"pad": "x" * 200_000}))
    with pytest.raises(DeltaError, match="header length"):
        transport.unpack(handmade(meta, specs_of(manifest), zeros_for(specs_of(manifest))), "up", manifest=manifest)


def test_a_raw_delta_for_another_bundle_is_refused_from_its_header():
    d = make_delta()
    d.tensors["m.lora_A"] = np.zeros((9, 64), np.float32)
    d.tensors["m.lora_B"] = np.zeros((48, 9), np.float32)
    d.meta.rank = 9
    with pytest.raises(DeltaError, match="to train"):
        delta_from_bytes(delta_bytes(d), "up", make_manifest(), for_training=True)


def test_streamed_unpack_still_round_trips_within_its_bound():
    d = make_delta()
    back = transport.unpack(transport.pack(d), manifest=make_manifest(), for_training=True)
    for k, t in d.tensors.items():
        assert np.abs(back.tensors[k] - t).max() <= transport.error_bound(d)


def test_the_largest_file_a_bundle_allows_holds_an_honest_raw_delta():
    assert len(delta_bytes(make_delta())) <= max_file_bytes(make_manifest())
