"""The transport form of a delta: int8 per-row symmetric quantization, then zstd. What travels on sync.

Bytes: ``MAGIC`` (5 bytes, the last one the version) + one zstd frame (content size and checksum
written). The frame holds: u32 LE header length, JSON header ``{"format", "meta", "tensors":
[[name, shape], ...]}``, then per tensor in header order its row scales (float32 LE, one per row)
and its int8 values (row-major). Rows are the first axis; a 1-D tensor is one row.

Quantization of a row x: s = max|x| / 127 (stored as float32), q = round(x / s) in [-127, 127],
x̂ = q * s, so for every element

    |x - x̂| <= s * (1/2 + 254 * 2**-24)   (about max|x| / 254: half a step, plus float32 rounding)

which :func:`row_error_bounds` computes and ``edgepeft delta inspect`` prints beside the actual error.
A zero row comes back exactly zero.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

try:  # the standard library's zstd (Python 3.14+), or its 2 MB backport (the zstandard wheel installs 24 MB)
    from compression import zstd
except ImportError:
    from backports import zstd

from edgepeft.delta.format import (Delta, DeltaMeta, check_against_manifest, check_shapes, check_structure, header_cap, meta_from_strings,
                                   meta_to_strings)
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest
from edgepeft.names import is_safe_name

MAGIC = b"EPDQ\x01"
PACKED_FORMAT = "edgepeft-delta-packed"
MAX_UNPACKED_BYTES = 512 * 1024 * 1024  # a delta is KBs to tens of MBs; refuse bombs before allocating
MAX_HEADER_BYTES = 16 * 1024 * 1024
ZSTD_LEVEL = 10


def row_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length) of a tensor: first axis rows, a 1-D tensor is one row."""
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])  # a Python int: no numpy call per tensor, no int64 overflow


def _row_scales(x2: np.ndarray) -> np.ndarray:
    """The stored float32 scale of every row of a (rows, n) array: max|row| / 127."""
    return (np.abs(x2).max(axis=1, initial=0.0) / 127.0).astype(np.float32)


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: (scales float32 (rows,), values int8 (rows, n)); |x - q*s| <= s/2."""
    rows, n = row_layout(x.shape)
    x2 = x.reshape(rows, n).astype(np.float64)
    scales = _row_scales(x2)
    s = scales.astype(np.float64)[:, None]  # divide by the stored scale so the bound holds for it
    q = np.rint(np.divide(x2, s, out=np.zeros_like(x2), where=s > 0))
    return scales, np.clip(q, -127, 127).astype(np.int8)


def row_error_bounds(x: np.ndarray) -> np.ndarray:
    """Per row of ``x`` (first axis; a 1-D tensor is one row), the largest |x - x̂| packing can cause."""
    rows, n = row_layout(x.shape)
    return _row_scales(x.reshape(rows, n).astype(np.float64)).astype(np.float64) * (0.5 + 254 * 2.0**-24)


def error_bound(delta: Delta) -> float:
    """The stated bound on max |x - x̂| over every tensor of ``delta`` after pack + unpack."""
    return max((float(row_error_bounds(t).max(initial=0.0)) for t in delta.tensors.values()), default=0.0)


def dequantize(scales: np.ndarray, q: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`quantize`, float32 of ``shape``."""
    out = np.empty(q.shape, np.float32)
    with np.errstate(over="ignore"):  # a hostile scale overflows to inf; check_structure refuses it
        np.multiply(q, scales[:, None], out=out)  # no float32 copy of q: the product is written in place
    return out.reshape(shape)


def pack(delta: Delta) -> bytes:
    """The transport bytes of ``delta``: quantized, then zstd-compressed."""
    check_structure(delta, "delta")
    names = sorted(delta.tensors)
    header = {
        "format": PACKED_FORMAT,
        "meta": meta_to_strings(delta.meta),
        "tensors": [[n, list(delta.tensors[n].shape)] for n in names],
    }
    hb = json.dumps(header, sort_keys=True).encode("utf-8")
    parts = [struct.pack("<I", len(hb)), hb]
    for n in names:
        scales, q = quantize(delta.tensors[n])
        parts += [scales.astype("<f4").tobytes(), q.tobytes()]
    options = {zstd.CompressionParameter.compression_level: ZSTD_LEVEL, zstd.CompressionParameter.checksum_flag: 1,
               zstd.CompressionParameter.content_size_flag: 1}
    return MAGIC + zstd.compress(b"".join(parts), options=options)


class Frame:
    """Reads a zstd frame's content in pieces, never more than asked: the header is checked before the payload exists."""

    def __init__(self, data: bytes, where: str) -> None:
        if len(data) < len(MAGIC) or data[:4] != MAGIC[:4]:
            raise DeltaError(f"{where}: not a packed delta (bad magic)")
        if data[4:5] != MAGIC[4:]:
            raise DeltaError(f"{where}: packed delta version {data[4]}; this edgepeft reads {MAGIC[4]}")
        frame = memoryview(data)[len(MAGIC):]
        try:
            size = zstd.get_frame_info(frame).decompressed_size
            frame_bytes = zstd.get_frame_size(frame)
        except zstd.ZstdError:
            raise DeltaError(f"{where}: corrupt zstd frame header") from None
        if size is None or size > MAX_UNPACKED_BYTES:
            raise DeltaError(f"{where}: zstd frame declares {-1 if size is None else size} bytes; expected 0..{MAX_UNPACKED_BYTES}")
        if frame_bytes != len(frame):
            raise DeltaError(f"{where}: {len(frame) - frame_bytes} bytes after the zstd frame")
        self.where, self.size, self.read_bytes = where, size, 0
        self._dctx, self._input = zstd.ZstdDecompressor(), frame

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes of content; DeltaError if the frame ends (or is corrupt) before."""
        if self.read_bytes + n > self.size:
            raise DeltaError(f"{self.where}: packed payload is {self.size} bytes, its header describes more")
        parts, got = [], 0
        while got < n:
            try:
                chunk = self._dctx.decompress(self._input, max_length=n - got)
            except (zstd.ZstdError, EOFError) as e:
                raise DeltaError(f"{self.where}: corrupt zstd data ({e})") from None
            self._input = b""
            if not chunk:
                raise DeltaError(f"{self.where}: zstd frame does not hold the {self.size} bytes it declares")
            parts.append(chunk)
            got += len(chunk)
        self.read_bytes += n
        return b"".join(parts)

    def finish(self) -> None:
        """Check that the content ended exactly where the header said, and the frame's checksum."""
        if self.read_bytes != self.size:
            raise DeltaError(f"{self.where}: packed payload is {self.size} bytes, its header describes {self.read_bytes}")
        if not self._dctx.eof:
            try:
                extra = self._dctx.decompress(self._input, max_length=1)
            except (zstd.ZstdError, EOFError) as e:
                raise DeltaError(f"{self.where}: corrupt zstd data ({e})") from None
            if extra or not self._dctx.eof:
                raise DeltaError(f"{self.where}: zstd frame does not hold the {self.size} bytes it declares")


def parse_header(frame: Frame, where: str, cap: int) -> dict:
    """A packed delta's JSON header (its length first, at most ``cap`` bytes), read from the frame and checked."""
    if frame.size < 4:
        raise DeltaError(f"{where}: packed payload truncated")
    (n,) = struct.unpack("<I", frame.read(4))
    if n > cap or 4 + n > frame.size:
        raise DeltaError(f"{where}: packed header length {n} does not fit the {frame.size}-byte payload")
    try:
        header = json.loads(frame.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DeltaError(f"{where}: packed header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != PACKED_FORMAT:
        raise DeltaError(f"{where}: packed header 'format' is not {PACKED_FORMAT!r}")
    md, specs = header.get("meta"), header.get("tensors")
    if not isinstance(md, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        raise DeltaError(f"{where}: packed header 'meta' must map strings to strings")
    if not isinstance(specs, list):
        raise DeltaError(f"{where}: packed header 'tensors' must be a list")
    return header


def tensor_specs(specs: list, where: str) -> list[tuple[str, tuple[int, ...]]]:
    """The header's tensor list as (name, shape) pairs: safe names, once each, sizes that fit."""
    out, seen = [], set()
    for spec in specs:
        ok = isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], list)
        shape = spec[1] if ok else []
        ok = ok and 1 <= len(shape) <= 2 and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
        if not ok:
            raise DeltaError(f"{where}: packed header has a malformed tensor entry {str(spec)[:80]}")
        name = spec[0]
        if not is_safe_name(name) or name in seen:
            raise DeltaError(f"{where}: packed tensor name {name!r} is unsafe or repeated")
        seen.add(name)
        out.append((name, tuple(shape)))
    return out


def payload_size(header_bytes: int, specs: list[tuple[str, tuple[int, ...]]]) -> int:
    """Exact content size of a packed delta: u32 + header + per tensor one float32 scale and n int8 per row."""
    return 4 + header_bytes + sum(r * 4 + r * n for r, n in (row_layout(s) for _, s in specs))


def unpack(data: bytes, where: str = "packed delta", *, manifest: Manifest | None = None, for_training: bool = False,
           codes: dict[str, np.ndarray] | None = None) -> Delta:
    """Parse transport bytes into a checked Delta (values dequantized; see the module's error bound).
    ``codes``: filled with each tensor's int8 values as stored (what ``quantize`` gives; the hub's content id uses them).

    Streams: the header is decompressed first and, given a manifest, its names and shapes are checked
    against it; then the declared content size must equal what the header describes, and only then
    is each tensor decompressed, one at a time, straight into its float32 result.
    """
    frame = Frame(data, where)
    header = parse_header(frame, where, header_cap(manifest))
    meta = meta_from_strings(header["meta"], where)
    specs = tensor_specs(header["tensors"], where)
    if manifest is not None:
        check_shapes(dict(specs), meta, manifest, where, for_training=for_training)
    need = payload_size(frame.read_bytes - 4, specs)
    if need != frame.size:
        raise DeltaError(f"{where}: packed payload is {frame.size} bytes, its header describes {need}")
    tensors = {}
    for name, shape in specs:
        rows, n = row_layout(shape)
        scales = np.frombuffer(frame.read(rows * 4), dtype="<f4").astype(np.float32)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise DeltaError(f"{where}: tensor {name!r} has a negative or non-finite row scale")
        q = np.frombuffer(frame.read(rows * n), dtype=np.int8).reshape(rows, n)
        if (q == -128).any():
            raise DeltaError(f"{where}: tensor {name!r} holds -128, which the packer never writes")
        tensors[name] = dequantize(scales, q, shape)
        if codes is not None:
            codes[name] = q
    frame.finish()
    delta = Delta(tensors, meta)
    check_structure(delta, where)
    if manifest is not None:
        check_against_manifest(delta, manifest, where, for_training=for_training)
    return delta


def packed_meta(data: bytes, where: str, manifest: Manifest | None = None) -> DeltaMeta:
    """The meta of transport bytes, reading only the (capped) header: nothing else is decompressed."""
    return meta_from_strings(parse_header(Frame(data, where), where, header_cap(manifest))["meta"], where)


def is_packed(data: bytes) -> bool:
    """True if ``data`` starts like a packed delta (any version)."""
    return data[:4] == MAGIC[:4]
