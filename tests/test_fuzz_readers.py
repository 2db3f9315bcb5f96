"""Hypothesis on the file readers (delta, packed delta, manifest, checkpoint): for any bytes, mutated from
a valid file or made up, a reader returns a checked value or raises edgepeft's own one-line error; it
never raises anything else, writes nothing, and stays within a bounded amount of memory."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_delta_transport import make_delta, make_manifest

from edgepeft.delta import transport
from edgepeft.delta.format import delta_bytes, delta_from_bytes, max_file_bytes
from edgepeft.errors import EdgePeftError
from edgepeft.manifest import Manifest
from edgepeft.runtime import checkpoint as ckpt

EXAMPLES = int(os.environ.get("EDGEPEFT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))

MANIFEST = make_manifest()
RAW = delta_bytes(make_delta())
PACKED = transport.pack(make_delta())
MANIFEST_JSON = Manifest.to_json(MANIFEST).encode()


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """``valid`` with a few bytes overwritten, a slice cut or repeated, or bytes inserted; sometimes made up."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=2048))
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "cut", "insert", "truncate", "repeat"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 256))] * draw(st.integers(1, 8))
    return bytes(data)


def only_our_errors(read, data: bytes, peak_cap: int) -> None:
    """``read(data)`` succeeds or raises EdgePeftError with a one-line message, under ``peak_cap`` heap bytes."""
    tracemalloc.start()
    try:
        read(data)
    except EdgePeftError as e:
        assert "\n" not in str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= peak_cap, f"peak {peak} bytes for a {len(data)}-byte input"


CAP = 3 * max_file_bytes(MANIFEST) + (1 << 20)  # the bundle bounds what any accepted delta can cost


@FUZZ
@given(data=mutated(RAW))
def test_the_delta_reader_survives_any_bytes(data):
    only_our_errors(lambda b: delta_from_bytes(b, "fuzz", MANIFEST, for_training=True), data, CAP)
    only_our_errors(lambda b: delta_from_bytes(b, "fuzz"), data, 4 * len(data) + (1 << 20))


@FUZZ
@given(data=mutated(PACKED))
def test_the_packed_reader_survives_any_bytes(data):
    only_our_errors(lambda b: transport.unpack(b, "fuzz", manifest=MANIFEST, for_training=True), data, CAP)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=20)


@pytest.mark.filterwarnings("ignore:fuzz. unknown key")
@FUZZ
@given(data=mutated(MANIFEST_JSON), key=st.sampled_from(sorted(json.loads(MANIFEST_JSON))), value=json_values)
def test_the_manifest_reader_survives_any_bytes_and_any_field_value(data, key, value):
    only_our_errors(lambda b: Manifest.from_json(b, "fuzz"), data, 64 * len(data) + (1 << 20))
    edited = json.loads(MANIFEST_JSON)
    edited[key] = value
    text = json.dumps(edited).encode()
    only_our_errors(lambda b: Manifest.from_json(b, "fuzz"), text, 64 * len(text) + (1 << 20))


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    from test_hostile_inputs import good_state

    d = tmp_path_factory.mktemp("ckpt")
    ckpt.save_checkpoint(d, {"delta.m.bias": make_delta().tensors["m.bias"]}, good_state())
    return ckpt.checkpoint_path(d).read_bytes()


@FUZZ
@given(seed=st.data())
def test_the_checkpoint_reader_survives_any_bytes_and_writes_nothing(tmp_path_factory, checkpoint_bytes, seed):
    data = seed.draw(mutated(checkpoint_bytes))
    d = tmp_path_factory.mktemp("fuzz-ckpt", numbered=True)
    ckpt.checkpoint_path(d).write_bytes(data)
    before = sorted(p.name for p in Path(d).iterdir())
    only_our_errors(lambda _: ckpt.load_checkpoint(d), data, 8 * len(data) + (1 << 20))
    assert sorted(p.name for p in Path(d).iterdir()) == before


@settings(max_examples=max(10, EXAMPLES // 5), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=mutated(PACKED))
def test_the_cli_reads_any_packed_bytes_without_a_traceback_or_a_write_beside_its_output(tmp_path_factory, capsys, data):
    from cli_helpers import run_cli

    from edgepeft.manifest import write_manifest

    d = tmp_path_factory.mktemp("cli", numbered=True)
    (d / "bundle").mkdir()
    write_manifest(d / "bundle", MANIFEST)
    (d / "in.packed").write_bytes(data)
    before = {p for p in d.rglob("*")}
    r = run_cli(capsys, "delta", "unpack", str(d / "in.packed"), "-o", str(d / "out.delta"), "--bundle", str(d / "bundle"))
    new = {p for p in d.rglob("*")} - before
    assert "Traceback" not in r.err
    if r.code == 0:
        assert new == {d / "out.delta"}
    else:
        assert new == set() and len([line for line in r.err.splitlines() if line.strip()]) == 1
