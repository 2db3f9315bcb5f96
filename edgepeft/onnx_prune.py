"""Cut a graph down to some of its outputs, without onnx: the device's way to stop a train step's backward pass early.

onnxruntime runs every node of a graph whatever outputs a run asks for, and it does not drop nodes that feed no
graph output either (measured: 390 nodes after optimization with and without the unwanted outputs). So the trainer
asks for a copy of ``train.onnx`` whose outputs are the loss and the gradients it trains, with every node those
outputs do not depend on removed: the backward pass below the deepest trained slot, and the gradients of the slots
held neutral, disappear. The copy is made from the protobuf wire format alone (onnx/onnx.proto3 field numbers), so
every byte that is kept is the original's; a graph with subgraphs (If, Loop) is returned as it was.
"""

from __future__ import annotations

from typing import Iterator

from edgepeft.errors import BundleError

_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_OUTPUT = 1, 12
_NODE_INPUT, _NODE_OUTPUT, _NODE_ATTRIBUTE = 1, 2, 5
_ATTR_GRAPH, _ATTR_GRAPHS = 6, 11
_VALUE_NAME = 1


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise BundleError("not a readable ONNX model (its protobuf wire format is corrupt)")
        b = buf[i]
        out |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return out, i


def _fields(buf: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(field number, the field's raw bytes tag included, its payload for length-delimited fields else b"")."""
    i = 0
    while i < len(buf):
        start = i
        tag, i = _varint(buf, i)
        wire = tag & 7
        payload = b""
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            payload = buf[i:i + n]
            i += n
        else:
            raise BundleError(f"not a readable ONNX model (protobuf wire type {wire})")
        if i > len(buf):
            raise BundleError("not a readable ONNX model (a field runs past the end)")
        yield tag >> 3, buf[start:i], payload


def _strings(buf: bytes, number: int) -> list[str]:
    return [p.decode("utf-8") for n, _, p in _fields(buf) if n == number]


def _has_subgraph(node: bytes) -> bool:
    return any(n == _NODE_ATTRIBUTE and any(k in (_ATTR_GRAPH, _ATTR_GRAPHS) for k, _, _ in _fields(p))
               for n, _, p in _fields(node))


def _encode_len(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _graph(graph: bytes, keep: set[str]) -> bytes | None:
    """The graph with only the outputs in ``keep`` and the nodes they need; None if it holds subgraphs."""
    fields = list(_fields(graph))
    nodes = [p for n, _, p in fields if n == _GRAPH_NODE]
    if any(_has_subgraph(node) for node in nodes):
        return None
    live, needed = set(), set(keep)
    for i in range(len(nodes) - 1, -1, -1):  # ONNX stores nodes in topological order: walk it backwards
        if needed & set(_strings(nodes[i], _NODE_OUTPUT)):
            live.add(i)
            needed |= set(_strings(nodes[i], _NODE_INPUT))
    out, k = bytearray(), 0
    for n, raw, payload in fields:
        if n == _GRAPH_NODE:
            k += 1
            if k - 1 not in live:
                continue
        elif n == _GRAPH_OUTPUT and _strings(payload, _VALUE_NAME)[0] not in keep:
            continue
        out += raw
    return bytes(out)


def prune_outputs(model: bytes, keep: set[str]) -> bytes:
    """A serialized ModelProto reduced to the outputs ``keep`` and the nodes they depend on (BundleError if unreadable)."""
    out = bytearray()
    for n, raw, payload in _fields(model):
        if n != _MODEL_GRAPH:
            out += raw
            continue
        graph = _graph(payload, keep)
        if graph is None:
            return model
        out += _encode_len((_MODEL_GRAPH << 3) | 2) + _encode_len(len(graph)) + graph
    return bytes(out)
