"""Frozen weights: from graph inputs to initializers stored once, in ``weights.bin``, shared by both graphs.

Each quantized weight ``W`` becomes ``W.q`` (int8 or int4) and ``W.scale`` feeding a
``DequantizeLinear`` whose output is named ``W``, so the rest of the graph is untouched. A
``Gather`` of rows of an int8 weight quantized per row (an embedding table, an LM head's target
rows) reads int8 rows and scales them after, so it needs no fp32 copy of the weight.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepeft import atomic
from edgepeft.names import WEIGHTS_FILE, WEIGHTS_INDEX_FILE
from edgepeft.exporters import quantize

ALIGN = 64


@dataclass(frozen=True)
class QuantSpec:
    """How one frozen weight is quantized: its output-channel axis and whether it is an embedding."""

    axis: int
    embedding: bool = False


class WeightFile:
    """Collects tensors into one buffer (64-byte aligned); a name is stored once however often used."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.index: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}  # name -> offset, length, dtype, dims
        self.quantized: dict[str, dict] = {}  # frozen weight -> {"axis": .., "block": ..} of its .q/.scale pair

    def add(self, name: str, raw: bytes, onnx_dtype: int, dims: tuple[int, ...]) -> None:
        if name in self.index:
            return
        self.buf.extend(b"\0" * (-len(self.buf) % ALIGN))
        self.index[name] = (len(self.buf), len(raw), onnx_dtype, dims)
        self.buf.extend(raw)

    def tensor(self, name: str) -> TensorProto:
        """An initializer that points into weights.bin."""
        offset, length, dtype, dims = self.index[name]
        t = TensorProto(name=name, data_type=dtype, dims=list(dims))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        return t

    def index_json(self) -> str:
        """The numpy-readable index of weights.bin (``runtime.weights`` reads it, no onnx needed)."""
        names = {TensorProto.FLOAT: "float32", TensorProto.INT8: "int8", TensorProto.INT4: "int4",
                 TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.BOOL: "bool"}
        tensors = {n: {"offset": o, "length": ln, "dtype": names.get(dt, str(dt)), "shape": list(d)}
                   for n, (o, ln, dt, d) in self.index.items()}
        return json.dumps({"tensors": tensors, "quantized": self.quantized}, indent=0, sort_keys=True)

    def sha256(self) -> str:
        return hashlib.sha256(self.buf).hexdigest()


def _add_array(store: WeightFile, name: str, a: np.ndarray) -> None:
    store.add(name, np.ascontiguousarray(a).tobytes(), helper.np_dtype_to_tensor_dtype(a.dtype), tuple(a.shape))


def _store_quantized(store: WeightFile, name: str, w: np.ndarray, spec: QuantSpec, scheme: str) -> int | None:
    """Add W.q / W.scale to the store; return the int4 block size (None for int8)."""
    if scheme == "int4" and not spec.embedding:
        q, scale = quantize.int4_blockwise(w, axis=1 - spec.axis)
        store.add(name + ".q", quantize.pack_int4(q), TensorProto.INT4, tuple(q.shape))
        _add_array(store, name + ".scale", scale)
        return quantize.INT4_BLOCK
    q, scale = quantize.int8_per_channel(w, axis=spec.axis)
    _add_array(store, name + ".q", q)
    _add_array(store, name + ".scale", scale)
    return None


def _gather_int8(graph: onnx.GraphProto, node: onnx.NodeProto, name: str) -> list[onnx.NodeProto]:
    """Replace Gather(W, idx) by Gather(W.q, idx) * Unsqueeze(Gather(W.scale, idx), -1)."""
    idx, out = node.input[1], node.output[0]
    p = f"{out}__int8"
    axes = helper.make_tensor(p + "_axes", TensorProto.INT64, [1], [-1])
    graph.initializer.append(axes)
    return [
        helper.make_node("Gather", [name + ".q", idx], [p + "_q"], axis=0),
        helper.make_node("Cast", [p + "_q"], [p + "_qf"], to=TensorProto.FLOAT),
        helper.make_node("Gather", [name + ".scale", idx], [p + "_s"], axis=0),
        helper.make_node("Unsqueeze", [p + "_s", p + "_axes"], [p + "_s1"]),
        helper.make_node("Mul", [p + "_qf", p + "_s1"], [out]),
    ]


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or a Constant node's output, else None."""
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t) if n.attribute[0].name == "value" else None
    return None


def _row_slice(graph: onnx.GraphProto, node: onnx.NodeProto, name: str, axis: int, block: int | None) -> list | None:
    """Slice(W) along rows -> DequantizeLinear(Slice(W.q), Slice(W.scale) or W.scale): only those rows in fp32
    (the causal-LM loss reads its head in vocabulary blocks). None where the slice is not a plain row slice, or the
    weight is int4 (onnxruntime's Slice takes no int4: such a head is dequantized whole, then sliced)."""
    if block:
        return None
    ins = list(node.input) + [""] * (5 - len(node.input))
    axes = _constant(graph, ins[3]) if ins[3] else np.array([0])
    steps = _constant(graph, ins[4]) if ins[4] else np.array([1])
    if axes is None or steps is None or axes.tolist() != [0] or steps.tolist() != [1]:
        return None
    out = node.output[0]
    cut = [x for x in ins[1:] if x]
    scale = name + ".scale"
    nodes = [helper.make_node("Slice", [name + ".q", *cut], [out + "__q"])]
    if axis == 0:  # the scale has a row per weight row
        nodes.append(helper.make_node("Slice", [scale, *cut], [out + "__s"]))
        scale = out + "__s"
    return nodes + [helper.make_node("DequantizeLinear", [out + "__q", scale], [out], axis=axis)]


def attach(model: onnx.ModelProto, store: WeightFile, params: dict[str, np.ndarray],
           quant: dict[str, QuantSpec], scheme: str) -> None:
    """Turn the graph inputs named in ``params`` into initializers in ``store`` (quantized per ``quant``)."""
    graph = model.graph
    frozen = [i for i in graph.input if i.name in params]
    for i in frozen:
        graph.input.remove(i)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    prologue: list[onnx.NodeProto] = []
    for inp in frozen:
        name, w = inp.name, params[inp.name]
        spec = quant.get(name)
        if scheme == "none" or spec is None:
            _add_array(store, name, w)
            graph.initializer.append(store.tensor(name))
            continue
        block = _store_quantized(store, name, w, spec, scheme)
        store.quantized[name] = {"axis": spec.axis if block is None else 1 - spec.axis, "block": block}
        graph.initializer.extend([store.tensor(name + ".q"), store.tensor(name + ".scale")])
        users = consumers.get(name, [])
        # rows of a weight quantized per row (an embedding; an LM head, whose target rows the loss reads) are gathered as
        # int8 rows: a Gather of the dequantized weight would get its own fp32 copy of it from onnxruntime per reader
        gathers = [n for n in users if spec.axis == 0 and block is None and n.op_type == "Gather"
                   and n.input[0] == name and all(a.i == 0 for a in n.attribute if a.name == "axis")]
        axis = spec.axis if block is None else 1 - spec.axis
        slices = {id(n): r for n in users if n.op_type == "Slice" and n.input[0] == name
                  and (r := _row_slice(graph, n, name, axis, block)) is not None}
        for old, new_nodes in [(g, _gather_int8(graph, g, name)) for g in gathers] + \
                [(n, slices[id(n)]) for n in users if id(n) in slices]:
            at = list(graph.node).index(old)
            graph.node.remove(old)
            for k, new in enumerate(new_nodes):
                graph.node.insert(at + k, new)
        if len(gathers) + len(slices) < len(users):
            attrs = {"axis": axis} if block is None else {"axis": axis, "block_size": block}
            prologue.append(helper.make_node("DequantizeLinear", [name + ".q", name + ".scale"], [name],
                                             name=f"dequantize.{name}", **attrs))
    for k, node in enumerate(prologue):
        graph.node.insert(k, node)
    if scheme == "int4":
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx") and op.version < 21:
                op.version = 21  # blocked DequantizeLinear and INT4 need opset 21


def add_input_defaults(model: onnx.ModelProto, defaults: dict[str, np.ndarray]) -> None:
    """Give graph inputs a default value (an initializer of the same name), so a caller may leave them out.

    The inference graph's delta slots get the neutral values: plain onnxruntime then runs the base
    model with only the batch fed, and onnxruntime's ``LoraAdapter`` can fill the slots it names.
    """
    inputs = {i.name for i in model.graph.input}
    for name, value in defaults.items():
        if name not in inputs:
            raise ValueError(f"{name}: not an input of the graph")
        model.graph.initializer.append(numpy_helper.from_array(value, name))


def save_bundle_graphs(models: dict[str, onnx.ModelProto], files: dict[str, str], out_dir: str | os.PathLike,
                       params: dict[str, np.ndarray], quant: dict[str, QuantSpec], scheme: str) -> str:
    """Write each graph and the shared weights.bin into ``out_dir``; return the weights' sha256."""
    out = Path(os.fspath(out_dir))
    store = WeightFile()
    for key, model in models.items():
        model.graph.ClearField("value_info")  # stale shapes from the exporter confuse later passes
        attach(model, store, params, quant, scheme)
    atomic.write_bytes(out / WEIGHTS_FILE, bytes(store.buf))
    atomic.write_text(out / WEIGHTS_INDEX_FILE, store.index_json())
    for key, model in models.items():
        atomic.write_bytes(out / files[key], model.SerializeToString())
    return store.sha256()


def load_params(params: dict[str, "object"]) -> dict[str, np.ndarray]:
    """torch tensors -> contiguous numpy arrays (float32 for floating point)."""
    out = {}
    for k, v in params.items():
        a = v.detach().cpu().numpy()
        out[k] = a.astype(np.float32) if a.dtype.kind == "f" else a
    return out

