"""A packed upload checked from its int8 codes and row scales, never dequantized into float32.

Every check the device reader (``transport.unpack``) makes holds here, from cheaper evidence:
- names, dims, LoRA pairs and ranks, shapes against the bundle depend only on the header's (name, shape) list and
  the meta's fingerprint and rank: the reader's own checks run on zero-strided shells once per such layout (a
  fleet's deltas share one), and a layout that passed is remembered;
- a value is x = q * s (int8 code, its row's float32 scale), so a row's largest |x| is max|q| * s: computed in
  float32 as ``dequantize`` does (an int8 times a float32 is exact in float64, so the float32 rounding is the same),
  its values are finite iff that product is, and the upload's largest |x| is the largest row's;
- the payload is decompressed in one call, only after its declared size equals what the checked layout needs
  (the bundle bounds it), and the checks are a few numpy passes over all tensors at once, not a loop over them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from edgepeft.delta.format import Delta, DeltaMeta, check_shapes, check_structure, header_cap, meta_from_strings
from edgepeft.delta.transport import _Frame, _parse_header, _rows, _tensor_specs
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest

LAYOUTS_KEPT = 64  # layouts remembered (a fleet has one per LoRA rank it takes)
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Layout:
    """Where each tensor's scales and codes sit in a payload of one checked (name, shape) list."""

    specs: tuple[tuple[str, tuple[int, ...]], ...]
    scale_bytes: np.ndarray  # payload byte offsets of every row scale, 4 per row, rows in header order
    code_bytes: np.ndarray  # payload byte offsets of every int8 code, in header order
    row_starts: np.ndarray  # index of each row's first code within the gathered codes
    tensor_rows: tuple[int, ...]  # rows per tensor, header order
    row_lengths: tuple[int, ...]  # codes per row, per tensor
    payload_bytes: int  # scales and codes of every tensor: what follows the header


@dataclass(frozen=True)
class CheckedPacked:
    """A packed upload that passed every reader check: its meta, shapes, int8 codes per tensor, largest |x|."""

    meta: DeltaMeta
    shapes: dict[str, tuple[int, ...]]
    codes: dict[str, np.ndarray]
    largest: float


_layouts: OrderedDict[tuple, tuple[Manifest, Layout]] = OrderedDict()
_layouts_lock = threading.Lock()


def _layout(specs: list[tuple[str, tuple[int, ...]]], meta: DeltaMeta, manifest: Manifest, where: str) -> Layout:
    """The layout of ``specs``, checked against ``manifest`` (for training) and the reader's structure checks."""
    key = (id(manifest), meta.base_fingerprint, meta.rank, tuple(specs))
    with _layouts_lock:
        hit = _layouts.get(key)
    if hit is not None and hit[0] is manifest:  # the manifest is kept in the entry: its id cannot be reused meanwhile
        return hit[1]
    shapes = dict(specs)
    check_shapes(shapes, meta, manifest, where, for_training=True)
    check_structure(Delta({n: np.broadcast_to(np.float32(0), s) for n, s in shapes.items()}, meta), where)
    scale_bytes, code_bytes, row_starts, rows_of, lengths = [], [], [], [], []
    offset = codes_so_far = 0
    for _, shape in specs:
        rows, n = _rows(shape)
        scale_bytes.append(np.arange(offset, offset + 4 * rows))
        code_bytes.append(np.arange(offset + 4 * rows, offset + 4 * rows + rows * n))
        row_starts.append(codes_so_far + n * np.arange(rows))
        rows_of.append(rows)
        lengths.append(n)
        offset += rows * (4 + n)
        codes_so_far += rows * n
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    layout = Layout(tuple(specs), cat(scale_bytes), cat(code_bytes), cat(row_starts), tuple(rows_of), tuple(lengths), offset)
    with _layouts_lock:
        _layouts[key] = (manifest, layout)
        while len(_layouts) > LAYOUTS_KEPT:
            _layouts.popitem(last=False)
    return layout


def check_packed(data: bytes, where: str, manifest: Manifest) -> CheckedPacked:
    """Every check ``transport.unpack(data, manifest=manifest, for_training=True)`` makes, without its float32 tensors."""
    frame = _Frame(data, where)
    header = _parse_header(frame, where, header_cap(manifest))
    meta = meta_from_strings(header["meta"], where)
    specs = _tensor_specs(header["tensors"], where)
    layout = _layout(specs, meta, manifest, where)
    need = frame.read_bytes + layout.payload_bytes  # payload_size(), from the layout
    if need != frame.size:
        raise DeltaError(f"{where}: packed payload is {frame.size} bytes, its header describes {need}")
    payload = np.frombuffer(frame.read(frame.size - frame.read_bytes), np.uint8)
    frame.finish()
    scales = payload[layout.scale_bytes].view("<f4")
    codes = payload[layout.code_bytes].view(np.int8)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        bad = ~(np.isfinite(scales) & (scales >= 0))
        raise DeltaError(f"{where}: tensor {_tensor_of_row(layout, int(bad.argmax()))!r} has a negative or non-finite row scale")
    if (codes == -128).any():
        row = int(np.searchsorted(layout.row_starts, int((codes == -128).argmax()), side="right")) - 1
        raise DeltaError(f"{where}: tensor {_tensor_of_row(layout, row)!r} holds -128, which the packer never writes")
    row_max = _row_max(codes, layout, len(scales))
    with np.errstate(over="ignore"):
        row_largest = row_max * scales.astype(np.float32)  # what dequantize computes for each row's largest code
    if not np.isfinite(row_largest).all():
        row = int((~np.isfinite(row_largest)).argmax())
        raise DeltaError(f"{where}: tensor {_tensor_of_row(layout, row)!r} has non-finite value(s) (NaN or Inf): a row "
                         "scale times its codes overflows float32")
    out, at = {}, 0
    for (name, _), rows, n in zip(specs, layout.tensor_rows, layout.row_lengths):
        out[name] = codes[at:at + rows * n].reshape(rows, n)
        at += rows * n
    return CheckedPacked(meta, dict(specs), out, float(row_largest.max(initial=0.0)))


def _row_max(codes: np.ndarray, layout: Layout, rows: int) -> np.ndarray:
    """max |code| of every row (0 for an empty row), as float32."""
    out = np.zeros(rows, np.float32)
    lengths = np.diff(np.append(layout.row_starts, codes.size))
    full = lengths > 0
    if full.any():
        out[full] = np.maximum.reduceat(np.abs(codes), layout.row_starts[full])
    return out


def _tensor_of_row(layout: Layout, row: int) -> str:
    """The name of the tensor that holds global row ``row`` (error messages only)."""
    for (name, _), rows in zip(layout.specs, layout.tensor_rows):
        if row < rows:
            return name
        row -= rows
    return "?"

