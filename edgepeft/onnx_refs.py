"""Which files an ONNX graph reads: the ``location`` of every external-data tensor, without onnx.

The device has no ``onnx`` package, so this walks the protobuf wire format itself, descending only into
the messages that can hold a tensor (onnx/onnx.proto3 field numbers) and skipping every other field by
its length. It lets a reader prove that both graphs of a bundle read exactly the fingerprinted weights
file, and nothing else.
"""

from __future__ import annotations

from edgepeft.errors import BundleError

MAX_DEPTH = 64  # subgraphs (If, Loop, Scan bodies) nest; anything deeper is not a real model

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


class _Bad(ValueError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Bad("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value: int or memoryview) of each field of one message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise _Bad(f"wire type {wire} (groups are not used by ONNX)")
        if pos > len(buf) or number == 0:
            raise _Bad("truncated field")
        yield number, wire, value


def _entry(buf: memoryview) -> tuple[str, str]:
    key = value = ""
    for number, wire, v in _fields(buf):
        if wire == 2 and number in (1, 2):
            text = bytes(v).decode("utf-8", errors="replace")
            key, value = (text, value) if number == 1 else (key, text)
    return key, value


def external_locations(model: bytes) -> set[str]:
    """The ``location`` of every external-data tensor anywhere in a serialized ModelProto; BundleError if unparsable."""
    found: set[str] = set()
    stack = [(memoryview(model), _MODEL, 0)]
    try:
        while stack:
            buf, kind, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise _Bad(f"graphs nested deeper than {MAX_DEPTH}")
            children = _CHILDREN[kind]
            for number, wire, value in _fields(buf):
                child = children.get(number)
                if child is None or wire != 2:
                    continue
                if child == _ENTRY:
                    key, loc = _entry(value)
                    if key == "location":
                        found.add(loc)
                else:
                    stack.append((value, child, depth + 1))
    except _Bad as e:
        raise BundleError(f"not a readable ONNX model ({e})") from None
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
