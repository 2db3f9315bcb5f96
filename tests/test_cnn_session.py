"""A CNN bundle's sessions dequantize its int8 weights once, at load: same step, onnxruntime's fast convolutions."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from edgepeft.delta import delta_from_init
from edgepeft.names import CNN_INPUTS, LABELS, LOSS, SEQ_CLS, grad_name
from edgepeft.runtime.bundle import SessionConfig, open_bundle
from edgepeft.runtime.trainer import _cnn_input_shape


def _step(bundle, config: SessionConfig) -> list[np.ndarray]:
    m = bundle.manifest
    outs = [LOSS] + [grad_name(s.name) for s in m.slots]
    rng = np.random.default_rng(0)
    delta = delta_from_init(m, 0)
    tensors = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in delta.tensors.items()}  # not at init
    feeds = {CNN_INPUTS[m.task]: rng.standard_normal((4, *_cnn_input_shape(m))).astype(np.float32),
             LABELS: rng.integers(0, len(m.labels), 4), **tensors}
    return bundle.session("train", config, outputs=outs).run(outs, feeds)


def test_a_cnn_train_step_is_the_same_with_weights_dequantized_at_load(cnn_bundle):
    bundle = open_bundle(cnn_bundle("int8"))
    per_step, at_load = _step(bundle, SessionConfig(dequantize_at_load=False)), _step(bundle, SessionConfig())
    for a, b in zip(per_step, at_load):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_a_cnn_train_session_runs_no_dequantize_op(cnn_bundle, tmp_path):
    bundle = open_bundle(cnn_bundle("int8"))
    for config, left in ((SessionConfig(dequantize_at_load=False), True), (SessionConfig(), False)):
        so = config.for_graph("train", bundle.manifest.task).options()
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(str(bundle.graph_path("train")), so, providers=["CPUExecutionProvider"])
        ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph.node}
        assert ("DequantizeLinear" in ops) == left


def test_a_transformer_keeps_its_weights_int8_in_memory():
    assert SessionConfig().for_graph("train", SEQ_CLS).dequantize_at_load is False
    assert SessionConfig().for_graph("infer", SEQ_CLS).dequantize_at_load is False
