"""A packed upload checked from its int8 codes and row scales, never dequantized into float32.

Every check the device reader (``transport.unpack``) makes holds here, from cheaper evidence:
- names, dims, LoRA pairs and ranks, shapes against the bundle depend only on the header's (name, shape) list and
  the meta's fingerprint and rank: the reader's own checks run on zero-strided shells once per such layout (a
  fleet's deltas share one), and a layout that passed is remembered;
- a value is x = q * s (int8 code, its row's float32 scale), so a row's largest |x| is max|q| * s: computed in
  float32 as ``dequantize`` does (an int8 times a float32 is exact in float64, so the float32 rounding is the same),
  its values are finite iff that product is, and the upload's largest |x| is the largest row's; max|q| per row is
  one ``reduceat`` over |q| read as uint8 (where -128, the code the packer never writes, reads 128), a piece at a
  time;
- the payload is decompressed in one call, only after its declared size equals what the checked layout needs
  (the bundle bounds it), and the value checks are a few numpy passes over it, not a loop over tensors.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepeft.delta.format import Delta, DeltaMeta, check_shapes, check_structure, header_cap, meta_from_strings
from edgepeft.delta.transport import Frame, parse_header, row_layout, tensor_specs
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest

LAYOUTS_KEPT = 64  # layouts remembered (a fleet has one per LoRA rank it takes)
PIECE_BYTES = 32 * 1024  # payload bytes whose |code| is held at once (the largest code of every row: _largest_codes)


@dataclass(frozen=True)
class Layout:
    """Where each tensor's row scales and codes sit in the payload of one checked (name, shape) list."""

    specs: tuple[tuple[str, tuple[int, ...]], ...]
    scale_at: tuple[int, ...]  # payload offset of each tensor's row scales (float32 LE, one per row)
    codes_at: tuple[int, ...]  # payload offset of each tensor's int8 codes (rows x n, row-major)
    tensor_rows: tuple[int, ...]  # rows per tensor
    row_lengths: tuple[int, ...]  # codes per row, per tensor
    reduce_at: np.ndarray  # payload offsets for one reduceat: every non-empty row's start, and where each tensor's codes end
    rows_in_reduce: np.ndarray  # which reduceat results are rows (the others span the next tensor's scales)
    nonempty_rows: np.ndarray  # global indices of the rows those are (rows of zero length have no codes)
    payload_bytes: int  # scales and codes of every tensor: what follows the header
    pieces: tuple[tuple[int, int], ...]  # reduce_at index ranges of the payload's pieces of about PIECE_BYTES


@dataclass(frozen=True)
class CheckedPacked:
    """A packed upload that passed every reader check: its meta, shapes, int8 codes per tensor, largest |x|."""

    meta: DeltaMeta
    shapes: dict[str, tuple[int, ...]]
    codes: dict[str, np.ndarray]  # views into the decompressed payload
    largest: float


_layouts: OrderedDict[tuple, tuple[Manifest, Layout]] = OrderedDict()
_layouts_lock = threading.Lock()


def _layout(raw_specs: Any, meta: DeltaMeta, manifest: Manifest, where: str) -> Layout:
    """The layout of a header's tensor list, checked (``transport.tensor_specs``), then against ``manifest`` (for
    training) and by the reader's structure checks. Remembered by the list's repr: for what JSON gives (lists, str,
    int, float, bool, None) equal reprs are equal values, so a list seen before is not checked again."""
    last = _last_layout
    if (last is not None and last[0] is manifest and last[1] == (meta.base_fingerprint, meta.rank) and last[2] == raw_specs
            and all(type(d) is int for _, shape in raw_specs for d in shape)):
        # the list the last delta had (a round's deltas share one): compared in C, no repr. Equal lists can differ only
        # in number types (384.0 == 384, True == 1), which the reader refuses: the dimensions must be ints as checked
        return last[3]
    key = (id(manifest), meta.base_fingerprint, meta.rank, repr(raw_specs))
    with _layouts_lock:
        hit = _layouts.get(key)
    if hit is not None and hit[0] is manifest:  # the manifest is kept in the entry: its id cannot be reused meanwhile
        _remember(manifest, meta, raw_specs, hit[1])
        return hit[1]
    specs = tensor_specs(raw_specs, where)
    shapes = dict(specs)
    check_shapes(shapes, meta, manifest, where, for_training=True)
    check_structure(Delta({n: np.broadcast_to(np.float32(0), s) for n, s in shapes.items()}, meta), where)
    scale_at, codes_at, rows_of, lengths, marks, is_row, nonempty = [], [], [], [], [], [], []
    offset = first_row = 0
    for _, shape in specs:
        rows, n = row_layout(shape)
        scale_at.append(offset)
        codes_at.append(offset + 4 * rows)
        rows_of.append(rows)
        lengths.append(n)
        if rows and n:
            marks += [offset + 4 * rows + n * np.arange(rows), [offset + 4 * rows + rows * n]]
            is_row += [np.ones(rows, bool), [False]]
            nonempty.append(first_row + np.arange(rows))
        offset += rows * (4 + n)
        first_row += rows
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
    reduce_at, rows_in_reduce = cat(marks, np.int64), cat(is_row, bool)
    inside = reduce_at < offset  # the last tensor's end mark is the payload's end: no segment starts there
    reduce_at = reduce_at[inside]
    cuts = sorted(set(np.searchsorted(reduce_at, np.arange(0, offset, PIECE_BYTES)).tolist())) if len(reduce_at) else []
    layout = Layout(tuple(specs), tuple(scale_at), tuple(codes_at), tuple(rows_of), tuple(lengths), reduce_at,
                    rows_in_reduce[inside], cat(nonempty, np.int64), offset,
                    tuple((a, b) for a, b in zip(cuts, cuts[1:] + [len(reduce_at)]) if a < b))
    with _layouts_lock:
        _layouts[key] = (manifest, layout)
        while len(_layouts) > LAYOUTS_KEPT:
            _layouts.popitem(last=False)
    _remember(manifest, meta, raw_specs, layout)
    return layout


_last_layout: tuple | None = None  # (manifest, (fingerprint, rank), the header's tensor list, its Layout)


def _remember(manifest: Manifest, meta: DeltaMeta, raw_specs: Any, layout: Layout) -> None:
    """Keep the last checked tensor list (a copy: the caller's may change) for the next delta's fast path."""
    global _last_layout
    _last_layout = (manifest, (meta.base_fingerprint, meta.rank), copy.deepcopy(raw_specs), layout)


_caps: dict[int, tuple[Manifest, int]] = {}  # id(manifest) -> (manifest, its header cap): one sum over its slots, not one a delta


def _header_cap(manifest: Manifest) -> int:
    """``format.header_cap(manifest)``, remembered for the manifests last seen (the entry keeps the manifest, so its id
    is not reused while it is there)."""
    hit = _caps.get(id(manifest))
    if hit is not None and hit[0] is manifest:
        return hit[1]
    if len(_caps) >= LAYOUTS_KEPT:
        _caps.clear()
    cap = header_cap(manifest)
    _caps[id(manifest)] = (manifest, cap)
    return cap


def read_packed(data: bytes, where: str, manifest: Manifest) -> tuple[DeltaMeta, Layout, bytes]:
    """(meta, layout checked against the bundle, payload) of a packed delta: its header checked, its frame fully read."""
    frame = Frame(data, where)
    header = parse_header(frame, where, _header_cap(manifest))
    meta = meta_from_strings(header["meta"], where)
    layout = _layout(header["tensors"], meta, manifest, where)
    need = frame.read_bytes + layout.payload_bytes  # payload_size(), from the layout
    if need != frame.size:
        raise DeltaError(f"{where}: packed payload is {frame.size} bytes, its header describes {need}")
    payload = frame.read(layout.payload_bytes)  # the layout, checked against the bundle, bounds it
    frame.finish()
    return meta, layout, payload


def check_packed(data: bytes, where: str, manifest: Manifest) -> CheckedPacked:
    """Every check ``transport.unpack(data, manifest=manifest, for_training=True)`` makes, without its float32 tensors."""
    meta, layout, payload = read_packed(data, where, manifest)
    specs = layout.specs
    total_rows = sum(layout.tensor_rows)
    scales = np.concatenate([np.frombuffer(payload, "<f4", rows, at) for at, rows in zip(layout.scale_at, layout.tensor_rows)]
                            or [np.zeros(0, "<f4")])
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        row = int((~(np.isfinite(scales) & (scales >= 0))).argmax())
        raise DeltaError(f"{where}: tensor {_tensor_of_row(layout, row)!r} has a negative or non-finite row scale")
    q = np.frombuffer(payload, np.int8)
    largest_code = np.zeros(total_rows, np.uint8)
    if len(layout.reduce_at):
        largest_code[layout.nonempty_rows] = _largest_codes(q, layout)[layout.rows_in_reduce]
    if (largest_code == 128).any():
        raise DeltaError(f"{where}: tensor {_tensor_of_row(layout, int((largest_code == 128).argmax()))!r} holds -128, "
                         "which the packer never writes")
    with np.errstate(over="ignore"):  # what dequantize computes for each row's largest |code|: exact, then float32
        row_largest = largest_code.astype(np.float32) * scales.astype(np.float32)
    if not np.isfinite(row_largest).all():
        row = int((~np.isfinite(row_largest)).argmax())
        raise DeltaError(f"{where}: tensor {_tensor_of_row(layout, row)!r} has non-finite value(s) (NaN or Inf): a row "
                         "scale times its codes overflows float32")
    codes = {name: q[at:at + rows * n].reshape(rows, n)
             for (name, _), at, rows, n in zip(specs, layout.codes_at, layout.tensor_rows, layout.row_lengths)}
    return CheckedPacked(meta, dict(specs), codes, float(row_largest.max(initial=0.0)))


def _largest_codes(q: np.ndarray, layout: Layout) -> np.ndarray:
    """The largest |code| of each reduceat segment: one reduceat over |q| seen as uint8, piece by piece.

    |-128| wraps to -128 in int8, which reads 128 as uint8 while 0..127 stay themselves, so a row maximum of 128 is
    exactly a row holding -128: one pass instead of a maximum and a minimum pass. Pieces of about PIECE_BYTES (cut
    where a segment starts) keep the temporary |q| small: the payload itself is never copied."""
    at, end = layout.reduce_at, layout.payload_bytes
    parts = []
    for a, b in layout.pieces:
        stop = int(at[b]) if b < len(at) else end
        piece = q[int(at[a]):stop]
        parts.append(np.maximum.reduceat(np.abs(piece).view(np.uint8), at[a:b] - at[a]))
    return np.concatenate(parts)


def _tensor_of_row(layout: Layout, row: int) -> str:
    """The name of the tensor that holds global row ``row`` (error messages only)."""
    for (name, _), rows in zip(layout.specs, layout.tensor_rows):
        if row < rows:
            return name
        row -= rows
    return "?"

