"""What keeps a causal LM's train step small: the loss's graph as onnxruntime runs it, and the sessions' memory settings."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepeft.exporters.causal_lm import HEAD_BLOCKS
from edgepeft.names import ATTENTION_MASK, INPUT_IDS, LOGITS
from edgepeft.runtime.bundle import SessionConfig
from edgepeft.runtime.kv_cache import cache_specs, empty_cache


def _optimized_train_graph(bundle, tmp_path) -> onnx.GraphProto:
    """train.onnx as onnxruntime runs it with the train session's defaults (after its graph optimizations)."""
    so = SessionConfig().for_graph("train", bundle.manifest.task).options()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(bundle.graph_path("train")), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph


def _dequantized_rows(graph: onnx.GraphProto) -> dict[str, int]:
    """Each DequantizeLinear's output -> the rows of the int8 tensor it reads (folded slices are initializers)."""
    dims = {t.name: list(t.dims) for t in graph.initializer}
    return {n.output[0]: dims[n.input[0]][0] for n in graph.node
            if n.op_type == "DequantizeLinear" and len(dims.get(n.input[0], [])) == 2}


def test_the_quantized_head_is_dequantized_in_vocabulary_blocks_never_whole(bundles, tmp_path):
    # a whole fp32 copy of SmolLM2's head is 113 MB at the training peak; a block is 1/HEAD_BLOCKS of it
    bundle = bundles("llama", "int8")
    vocab = bundle.manifest.vocab_size
    rows = _dequantized_rows(_optimized_train_graph(bundle, tmp_path))
    blocks = [r for r in rows.values() if r <= -(-vocab // HEAD_BLOCKS)]
    assert vocab not in rows.values() and sum(blocks) >= vocab


def test_no_blocks_logits_are_read_by_a_gather(bundles, tmp_path):
    # a gather of the target logit from the logits ran as late as the loss sum, keeping every block's logits alive
    bundle = bundles("llama", "int8")
    graph = _optimized_train_graph(bundle, tmp_path)
    head = {o for o, r in _dequantized_rows(graph).items() if r <= -(-bundle.manifest.vocab_size // HEAD_BLOCKS)}
    weights = head | {o for n in graph.node if head & set(n.input) and n.op_type == "Transpose" for o in n.output}
    logits = {o for n in graph.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm") and weights & set(n.input[1:2])
              for o in n.output}
    readers = {n.op_type for n in graph.node if logits & set(n.input)}
    assert logits and "GatherElements" not in readers and "Gather" not in readers


def test_trained_layers_are_recomputed_in_the_backward_pass(model_dirs, bundles, tmp_path):
    # each trained layer's attention runs twice (forward, and again in the backward pass from the layer's saved input);
    # one Softmax per layer would mean onnxruntime merged the recomputation into the forward (its saved activations back)
    layers = json.loads((model_dirs("llama") / "config.json").read_text())["num_hidden_layers"]
    graph = _optimized_train_graph(bundles("llama", "int8", top_layers=1), tmp_path)
    assert sum(n.op_type == "Softmax" for n in graph.node) == layers + 1


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
