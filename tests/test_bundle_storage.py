"""Frozen weights are stored once, quantized weights stay quantized, the bundle checks itself."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from edgepeft.errors import BundleError
from edgepeft.names import FROZEN_PREFIX, WEIGHTS_INDEX_FILE
from edgepeft.runtime.bundle import open_bundle


def inline_bytes(path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return sum(len(t.raw_data) for t in m.graph.initializer)


def external_names(path) -> set[str]:
    m = onnx.load(str(path), load_external_data=False)
    return {t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def test_frozen_weights_are_stored_once_for_both_graphs(bundles):
    b = bundles("bert")
    weights = (b.path / "weights.bin").stat().st_size
    params = b.manifest.extra["base_parameters"]
    assert weights < 1.1 * 4 * params  # once, not once per graph or per transpose
    infer, train = external_names(b.graph_path("infer")), external_names(b.graph_path("train"))
    assert infer & train, "the graphs share no stored weight"
    assert all(n.startswith(FROZEN_PREFIX) for n in infer | train)
    for g in ("infer", "train"):
        assert inline_bytes(b.graph_path(g)) < 0.05 * weights  # no weight copies inside the graphs


def test_int8_weights_stay_int8_on_disk(bundles):
    fp32, int8 = bundles("bert"), bundles("bert", "int8")
    index = json.loads((int8.path / WEIGHTS_INDEX_FILE).read_text())
    q = [n for n, t in index["tensors"].items() if n.endswith(".q")]
    assert any("word_embeddings" in n for n in q) and any("query" in n for n in q)
    assert all(index["tensors"][n]["dtype"] == "int8" for n in q)
    assert (int8.path / "weights.bin").stat().st_size < 0.4 * (fp32.path / "weights.bin").stat().st_size


def test_int4_bundle_runs_and_stores_int4(bundles):
    from conftest import random_delta
    from edgepeft.runtime.infer import Predictor

    b4, b32 = bundles("llama", "int4"), bundles("llama")
    index = json.loads((b4.path / WEIGHTS_INDEX_FILE).read_text())
    assert any(t["dtype"] == "int4" for t in index["tensors"].values())
    ids = np.arange(4, 14, dtype=np.int64)[None]
    d = random_delta(b32.manifest)
    a = Predictor(b4).logits(ids, np.ones_like(ids), [d])
    ref = Predictor(b32).logits(ids, np.ones_like(ids), [d])
    assert np.abs(a - ref).max() < 0.25 * np.abs(ref).max()


def test_one_export_writes_each_quantization_as_its_own_bundle(bundles):
    # export_bundles traces once: the bundles share slots and graph inputs and differ in how weights are stored
    b = {q: bundles("bert", q) for q in ("none", "int8", "int4")}
    assert {q: x.manifest.quantization for q, x in b.items()} == {"none": "none", "int8": "int8", "int4": "int4"}
    assert len({x.manifest.fingerprint for x in b.values()}) == 3
    assert len({x.path for x in b.values()}) == 3
    assert b["none"].manifest.slots == b["int8"].manifest.slots == b["int4"].manifest.slots
    assert b["none"].manifest.graphs == b["int8"].manifest.graphs == b["int4"].manifest.graphs


def test_a_bundle_with_corrupt_weights_is_refused(bundles, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundles("bert").path, copy)
    with open(copy / "weights.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(BundleError, match="does not match the manifest fingerprint"):
        open_bundle(copy)


def test_a_bundle_with_a_corrupt_graph_is_refused_with_one_line(bundles, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundles("bert").path, copy)
    (copy / "train.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match="train.onnx: cannot be loaded") as e:
        open_bundle(copy).session("train")
    assert "\n" not in str(e.value)


def test_a_bundle_without_its_train_graph_is_refused(bundles, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundles("bert").path, copy)
    (copy / "train.onnx").unlink()
    with pytest.raises(BundleError, match="train.onnx: missing"):
        open_bundle(copy)
