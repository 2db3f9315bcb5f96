"""What keeps a causal LM's train step small: the loss's graph as onnxruntime runs it, and the sessions' memory settings."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepeft.names import ATTENTION_MASK, INPUT_IDS, LOGITS
from edgepeft.runtime.bundle import SessionConfig
from edgepeft.runtime.kv_cache import cache_specs, empty_cache


def _optimized_train_graph(bundle, tmp_path) -> onnx.GraphProto:
    """train.onnx as onnxruntime runs it with the train session's defaults (after its graph optimizations)."""
    so = SessionConfig().for_graph("train", bundle.manifest.task).options()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(bundle.graph_path("train")), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph


def _head_dequantizations(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("lm_head.weight.q")]


def test_onnxruntime_keeps_one_fp32_copy_of_the_quantized_head(bundles, tmp_path):
    # onnxruntime gives each MatMul reader of a quantized weight its own DequantizeLinear; read per chunk,
    # the head was dequantized once per chunk beside the copy the logits used (two (V, H) fp32 blocks alive)
    graph = _optimized_train_graph(bundles("llama", "int8"), tmp_path)
    assert len(_head_dequantizations(graph)) == 1


def test_no_chunks_logits_are_read_after_its_softmax(bundles, tmp_path):
    # a gather of the target logit from a chunk's (M, V) logits ran as late as the loss sum, keeping every chunk alive
    graph = _optimized_train_graph(bundles("llama", "int8"), tmp_path)
    head = {o for n in _head_dequantizations(graph) for o in n.output}
    logits = {o for n in graph.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm") and head & set(n.input)
              for o in n.output}
    readers = {n.op_type for n in graph.node if logits & set(n.input)}
    assert logits and "GatherElements" not in readers and "Gather" not in readers


@pytest.mark.parametrize("kind, graph, arena, pattern", [
    ("llama", "train", True, False), ("llama", "infer", False, False),
    ("bert", "train", True, True), ("bert", "infer", True, True)])
def test_sessions_get_their_graphs_memory_defaults(bundles, kind, graph, arena, pattern):
    so = bundles(kind, "int8").session(graph).get_session_options()
    assert (so.enable_cpu_mem_arena, so.enable_mem_pattern) == (arena, pattern)


def test_settings_given_explicitly_win_over_the_defaults(bundles):
    so = bundles("llama", "int8").session("train", SessionConfig(arena=False, mem_pattern=True)).get_session_options()
    assert (so.enable_cpu_mem_arena, so.enable_mem_pattern) == (False, True)


def test_sessions_on_shared_weights_compute_what_onnxruntime_alone_does(bundles):
    b = bundles("llama", "int8")
    ours = b.session("infer")
    plain = ort.InferenceSession(str(b.graph_path("infer")), providers=["CPUExecutionProvider"])  # maps the file itself
    ids = np.array([[5, 9, 14, 22, 7, 31]], np.int64)
    feeds = {INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids), **empty_cache(cache_specs(ours), 1)}
    np.testing.assert_array_equal(ours.run([LOGITS], feeds)[0], plain.run([LOGITS], feeds)[0])


def test_a_bundles_sessions_map_its_weights_once(bundles):  # Linux: reads /proc/self/smaps
    b = bundles("llama", "int8")
    b.session("infer"), b.session("train")
    weights = os.fspath((b.path / b.manifest.weights).resolve())
    with open("/proc/self/smaps") as f:
        mappings = sum(1 for line in f if line.rstrip().endswith(weights))
    assert mappings == 1
