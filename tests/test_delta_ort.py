"""``to-ort-adapter``: onnxruntime's own LoraAdapter + RunOptions.add_active_adapter gives the runtime's outputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from edgepeft.cli import cli
from edgepeft.delta import Delta, delta_from_init, save_delta
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
                                 "--bundle", str(b.path)])
    assert r.exit_code == 0, r.output
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(b.graph_path("infer")), so, providers=["CPUExecutionProvider"])  # the bundle's own graph
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
