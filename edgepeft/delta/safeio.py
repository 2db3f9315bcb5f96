"""Strict reading of safetensors bytes: every size, offset, dtype and name checked before any array exists.

Layout (huggingface/safetensors README, "Format"): u64 little-endian header length N, N bytes of JSON
(``{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {str: str}}``), then the data
buffer, which the offsets must cover exactly, with no holes and no overlaps.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np
import safetensors.numpy

from edgepeft.errors import DeltaError
from edgepeft.names import is_safe_name

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the cap safetensors itself uses

# safetensors dtype -> (bytes per element, how to turn raw bytes into float32)
_DTYPES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I64": 8,  # only where a caller allows it: a PEFT adapter's BatchNorm counter (num_batches_tracked)
}


@dataclass(frozen=True)
class Entry:
    """One tensor's header record, already checked against the buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset in the data buffer
    end: int


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: entries in buffer order, string metadata, where the data begins."""

    entries: tuple[Entry, ...]
    metadata: dict[str, str]
    data_start: int


def save(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """safetensors bytes whose header lists the metadata sorted: the same tensors and metadata give the same bytes.

    safetensors writes ``__metadata__`` in its hash map's order, which changes from one process (and one call) to
    the next, so a file written twice would hash differently. The tensors' records and the data are kept as written;
    reordering the metadata keeps the header's length, so no offset moves."""
    data = safetensors.numpy.save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # never expected: the same JSON in another key order; keep safetensors' own bytes then
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n:]


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[0]
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(data: bytes, where: str, *, dtypes: tuple[str, ...] = ("F32",), max_header: int = MAX_HEADER_BYTES) -> Header:
    """Check the header of safetensors ``data`` against its buffer; raise DeltaError naming ``where``.

    ``max_header`` caps the JSON before it is parsed (a reader that knows the expected slots passes a small one).
    """
    if len(data) < 8:
        raise DeltaError(f"{where}: truncated ({len(data)} bytes; a safetensors file has at least 8)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > max_header:
        raise DeltaError(f"{where}: header length {n} exceeds the {max_header}-byte cap; not a delta file")
    if 8 + n > len(data):
        raise DeltaError(f"{where}: truncated: header says {n} bytes but the file has {len(data) - 8} after the length")
    try:
        raw = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DeltaError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DeltaError(f"{where}: header is not a JSON object")
    metadata = raw.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise DeltaError(f"{where}: __metadata__ must map strings to strings")
    data_len = len(data) - 8 - n
    entries = []
    for name, rec in raw.items():
        if not is_safe_name(name):
            raise DeltaError(f"{where}: tensor name {name!r} is not allowed (path separators, '..' or control characters)")
        if not isinstance(rec, dict) or set(rec) != {"dtype", "shape", "data_offsets"}:
            raise DeltaError(f"{where}: tensor {name!r}: header record needs exactly dtype, shape, data_offsets")
        dtype, shape, offs = rec["dtype"], rec["shape"], rec["data_offsets"]
        if dtype not in dtypes:
            raise DeltaError(f"{where}: tensor {name!r} has dtype {dtype!r}; expected {' or '.join(dtypes)}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d < 2**40 for d in shape):
            raise DeltaError(f"{where}: tensor {name!r} has a malformed shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise DeltaError(f"{where}: tensor {name!r} has malformed data_offsets {offs!r}")
        start, end = offs
        if not 0 <= start <= end <= data_len:
            raise DeltaError(f"{where}: tensor {name!r} offsets [{start}, {end}] lie outside the {data_len}-byte data buffer")
        need = math.prod(shape) * _DTYPES[dtype]
        if end - start != need:
            raise DeltaError(f"{where}: tensor {name!r} has shape {tuple(shape)} ({need} bytes) but offsets span {end - start} bytes")
        entries.append(Entry(name, dtype, tuple(shape), start, end))
    entries.sort(key=lambda e: (e.start, e.end))
    pos = 0
    for e in entries:
        if e.start != pos:
            kind = "overlaps the previous tensor" if e.start < pos else f"leaves a hole at byte {pos}"
            raise DeltaError(f"{where}: tensor {e.name!r} at offset {e.start} {kind}")
        pos = e.end
    if pos != data_len:
        raise DeltaError(f"{where}: data buffer has {data_len - pos} bytes that no tensor covers")
    return Header(tuple(entries), metadata, 8 + n)


def read_arrays(data: bytes, header: Header) -> dict[str, np.ndarray]:
    """Arrays of a checked ``header`` as float32 copies (F16, BF16, F64 and I64 are converted)."""
    out = {}
    for e in header.entries:
        buf = data[header.data_start + e.start : header.data_start + e.end]
        if e.dtype == "BF16":  # bf16 is the top half of a float32
            a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(buf, dtype={"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8"}[e.dtype]).astype(np.float32)
        out[e.name] = a.reshape(e.shape)
    return out


def view_arrays(buf: bytes | memoryview, header: Header) -> dict[str, np.ndarray]:
    """Read-only float32 views of the F32 tensors of a checked ``header`` over ``buf`` (bytes or a memory map)."""
    out = {}
    for e in header.entries:
        if e.dtype != "F32":
            raise DeltaError(f"tensor {e.name!r} has dtype {e.dtype}; only F32 tensors can be viewed (use read_arrays)")
        count = (e.end - e.start) // 4
        out[e.name] = np.frombuffer(buf, dtype="<f4", count=count, offset=header.data_start + e.start).reshape(e.shape)
    return out
