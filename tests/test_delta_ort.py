"""``to-ort-adapter``: onnxruntime's own LoraAdapter + RunOptions.add_active_adapter gives the runtime's outputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from edgepeft.cli import cli
from edgepeft.delta import Delta, delta_from_init, save_delta
from edgepeft.delta.ort_adapter import adapter_ready_model
from edgepeft.runtime.infer import Predictor


def bundle_delta(bundle, seed: int = 0) -> Delta:
    d = delta_from_init(bundle.manifest, seed)
    rng = np.random.default_rng(seed + 1)
    return Delta({k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in d.tensors.items()}, d.meta)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_ort_lora_adapter_applies_the_delta_like_feeding_it(bundles, tmp_path, quantize):
    b = bundles("bert", quantize)
    d = bundle_delta(b)
    save_delta(tmp_path / "d.delta", d)
    r = CliRunner().invoke(cli, ["delta", "to-ort-adapter", str(tmp_path / "d.delta"), "-o", str(tmp_path / "d.onnx_adapter"),
                                 "--bundle", str(b.path), "--model-out", str(tmp_path / "model.onnx")])
    assert r.exit_code == 0, r.output
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), so, providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_inputs()} == {"input_ids", "attention_mask"}  # slots are optional there
    lora = ort.LoraAdapter()
    lora.Load(str(tmp_path / "d.onnx_adapter"))
    ro = ort.RunOptions()
    ro.add_active_adapter(lora)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, b.manifest.vocab_size, size=(3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    p = Predictor(b)
    np.testing.assert_allclose(sess.run(["logits"], feeds, ro)[0], p.logits(ids, mask, [d]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(sess.run(["logits"], feeds)[0], p.logits(ids, mask), rtol=0, atol=1e-5)  # no adapter: the base


def test_bundle_graph_alone_refuses_a_call_without_slot_feeds(bundles):
    """Why adapter_ready_model exists: model.onnx requires every slot input, so ORT adapters cannot supply them."""
    b = bundles("bert")
    sess = Predictor(b).session
    ids = np.full((1, 4), 5, np.int64)
    with pytest.raises(ValueError, match="Required inputs"):
        sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})


def test_adapter_ready_model_without_adapter_is_the_bundle_model(bundles, tmp_path):
    b = bundles("bert", "int8")
    adapter_ready_model(b.path, b.manifest, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(4, b.manifest.vocab_size, size=(2, 6)).astype(np.int64)
    out = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    np.testing.assert_allclose(out, Predictor(b).logits(ids, np.ones_like(ids)), rtol=0, atol=1e-5)
