"""Which files an ONNX graph reads: the ``location`` of every external-data tensor, without onnx.

The device has no ``onnx`` package, but it has protobuf (onnxruntime's own dependency): each message is
parsed as an empty message whose fields all stay unknown, and only the fields that can lead to a tensor
(onnx/onnx.proto3 field numbers) are descended into. It lets a reader prove that both graphs of a
bundle read exactly the fingerprinted weights file, and nothing else.
"""

from __future__ import annotations

from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from edgepeft.errors import BundleError

MAX_DEPTH = 64  # subgraphs (If, Loop, Scan bodies) nest; anything deeper is not a real model
_LENGTH_DELIMITED = 2

# message -> {field number: message type of that field}; tensors are where external data lives
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _FUNC, _TRAINING, _ENTRY = range(9)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNC},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _FUNC: {7: _NODE},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},
    _ENTRY: {},
}


def _fields(buf: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, data) of each field of one serialized message."""
    msg = empty_pb2.Empty()
    msg.ParseFromString(buf)
    return [(f.field_number, f.wire_type, f.data) for f in UnknownFieldSet(msg)]


def _entry(buf: bytes) -> tuple[str, str]:
    """(key, value) of a StringStringEntryProto."""
    found = {n: bytes(v).decode("utf-8", errors="replace") for n, w, v in _fields(buf) if w == _LENGTH_DELIMITED}
    return found.get(1, ""), found.get(2, "")


def external_locations(model: bytes) -> set[str]:
    """The ``location`` of every external-data tensor anywhere in a serialized ModelProto; BundleError if unparsable."""
    found: set[str] = set()
    stack = [(bytes(model), _MODEL, 0)]
    try:
        while stack:
            buf, kind, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise BundleError(f"not a readable ONNX model (graphs nested deeper than {MAX_DEPTH})")
            children = _CHILDREN[kind]
            for number, wire, value in _fields(buf):
                child = children.get(number)
                if child is None or wire != _LENGTH_DELIMITED:
                    continue
                if child == _ENTRY:
                    key, loc = _entry(value)
                    if key == "location":
                        found.add(loc)
                else:
                    stack.append((value, child, depth + 1))
    except DecodeError:
        raise BundleError("not a readable ONNX model (its protobuf wire format is corrupt)") from None
    return found


def check_reads_only(model: bytes, weights: str, where: str) -> None:
    """BundleError unless every external-data location of ``model`` is exactly the file ``weights``."""
    try:
        locations = external_locations(model)
    except BundleError as e:
        raise BundleError(f"{where}: cannot be loaded: {e}; re-copy or re-export the bundle") from None
    other = sorted(locations - {weights})
    if other:
        raise BundleError(f"{where}: the graph reads external data from {other[0][:80]!r}, not the fingerprinted "
                          f"{weights!r}; the bundle is inconsistent or tampered with")
