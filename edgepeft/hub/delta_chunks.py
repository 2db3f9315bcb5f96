"""Stored deltas read as chunks: k deltas of one layout, each slot stacked into one (k, *shape) float32 array.

The merge of thousands of deltas spends its time per delta, not per number, when each delta is parsed into its own
dict of small arrays (benchmarks/results/hub_agg.json, "profile"). Here a delta costs one header parse (its layout --
names, shapes, rank -- checked against the bundle once per layout, ``packed_check``) and one zstd decompression;
everything else is a few numpy operations per slot and chunk: the payloads of a chunk are one (k, payload) byte array,
a slot's values are strided views of it, dequantized together. Every check the reader (``transport.unpack``, for
training, against the bundle) makes holds, per chunk: scales finite and >= 0, no code -128, values finite.
Memory is the chunk's (``size`` payloads and one slot's float32 values), whatever the number of deltas.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from edgepeft.delta.format import DeltaMeta, delta_from_bytes
from edgepeft.delta.transport import is_packed
from edgepeft.errors import DeltaError
from edgepeft.hub.packed_check import Layout, read_packed
from edgepeft.manifest import Manifest

CHUNK = 256  # deltas per chunk: LoRA r=8 gives one (d x 2048) @ (2048 x d) product per module, near BLAS peak


@dataclass
class Chunk:
    """k checked deltas of one layout: their positions in the claimed order, metas, and each slot's stacked values."""

    positions: np.ndarray  # (k,) int: where each delta sits in the list being merged
    wheres: list[str]  # each delta's name in error messages
    metas: list[DeltaMeta]
    shapes: dict[str, tuple[int, ...]]
    payload: np.ndarray | None = None  # (k, payload bytes) uint8: packed deltas
    layout: Layout | None = None
    raw: dict[str, np.ndarray] = field(default_factory=dict)  # slot -> (k, *shape) float32: raw (safetensors) deltas

    def __len__(self) -> int:
        return len(self.metas)

    def factor(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Slot ``name`` of every delta as (codes (k, rows, n), row scales (k, rows) float32), value = code · scale
        exactly as ``transport.unpack`` computes it (one float32 rounding), every reader check made: a product can
        take the scales where they cost least instead of dequantizing first. Raw deltas: (values, ones)."""
        if self.layout is None:
            v = self.raw[name]
            v = v.reshape(len(self), 1, -1) if v.ndim == 2 else v.reshape(len(self), v.shape[1], -1)
            return v, np.ones(v.shape[:2], np.float32)
        assert self.payload is not None
        i = next(j for j, (n, _) in enumerate(self.layout.specs) if n == name)
        rows, n, k = self.layout.tensor_rows[i], self.layout.row_lengths[i], len(self)
        at = self.layout.scale_at[i]
        scales = np.ascontiguousarray(self.payload[:, at:at + 4 * rows]).view("<f4").astype(np.float32)  # (k, rows)
        bad = ~(np.isfinite(scales) & (scales >= 0)).all(axis=1)
        if bad.any():
            raise DeltaError(f"{self.wheres[int(bad.argmax())]}: tensor {name!r} has a negative or non-finite row scale")
        at = self.layout.codes_at[i]
        codes = self.payload[:, at:at + rows * n].view(np.int8).reshape(k, rows, n)  # strided view, no copy
        bad = (codes.min(axis=(1, 2), initial=0) == -128) if rows * n else np.zeros(k, bool)
        if bad.any():
            raise DeltaError(f"{self.wheres[int(bad.argmax())]}: tensor {name!r} holds -128, which the packer never writes")
        if not np.isfinite(np.float32(127) * scales.max(initial=0)):  # a value may overflow: check them all
            self._finite(name, codes, scales)
        return codes, scales

    def _finite(self, name: str, codes: np.ndarray, scales: np.ndarray) -> None:
        """Refuse, by the delta's name, a chunk where some code times its row scale overflows float32."""
        with np.errstate(over="ignore"):
            bad = ~np.isfinite(codes * scales[:, :, None]).reshape(len(self), -1).all(axis=1)
        if bad.any():
            raise DeltaError(f"{self.wheres[int(bad.argmax())]}: tensor {name!r} has non-finite value(s) (NaN or Inf)")

    def values(self, name: str) -> np.ndarray:
        """Slot ``name`` of every delta, (k, *shape) float32, as ``transport.unpack`` dequantizes it."""
        if self.layout is None:
            return self.raw[name]
        codes, scales = self.factor(name)
        k, rows, n = codes.shape
        out = np.empty((k, rows, n), np.float32)
        with np.errstate(over="ignore"):  # as dequantize: int8 times float32, rounded once to float32
            np.multiply(codes, scales[:, :, None], out=out)
        return out.reshape(k, *self.shapes[name])


def _chunk(items: list[tuple[int, str, DeltaMeta, object]], layout: Layout | None) -> Chunk:
    positions = np.array([p for p, _, _, _ in items], np.int64)
    wheres, metas = [w for _, w, _, _ in items], [m for _, _, m, _ in items]
    if layout is not None:
        payload = np.frombuffer(b"".join(x for _, _, _, x in items), np.uint8).reshape(len(items), -1)  # type: ignore[misc]
        return Chunk(positions, wheres, metas, dict(layout.specs), payload=payload, layout=layout)
    first = items[0][3].tensors  # type: ignore[attr-defined]
    raw = {n: np.stack([x.tensors[n] for _, _, _, x in items]) for n in first}  # type: ignore[attr-defined]
    return Chunk(positions, wheres, metas, {n: v.shape for n, v in first.items()}, raw=raw)


def chunks(blobs: Iterable[tuple[str, bytes]], manifest: Manifest, size: int | None = None,
           positions: Sequence[int] | None = None) -> Iterator[Chunk]:
    """The stored deltas ``blobs`` ((id, bytes), in merge order) as chunks of at most ``size`` (default ``CHUNK``)
    deltas of one layout (a fleet of mixed ranks has one layout per rank); every delta checked as the reader checks it.
    ``positions``: where each blob sits in the list being merged (default 0, 1, ...: all of it, in order).

    Read ahead by one chunk in a thread: reading the store and zstd release the GIL, so the next chunk is read and
    decompressed while the caller multiplies this one (a BLAS call, without the GIL too)."""
    return _read_ahead(_chunks(blobs, manifest, size or CHUNK, positions))


def _read_ahead(items: Iterator[Chunk], depth: int = 1) -> Iterator[Chunk]:
    """``items`` produced by a thread, at most ``depth`` ahead of the consumer (memory: depth + 2 chunks); the
    producer's exception is raised here, and a consumer that stops early stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> bool:
        """Queue ``item`` once there is room; False when the consumer has stopped."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
            put(e)

    thread = threading.Thread(target=produce, name="delta-chunks", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _chunks(blobs: Iterable[tuple[str, bytes]], manifest: Manifest, size: int,
            positions: Sequence[int] | None = None) -> Iterator[Chunk]:
    buckets: dict[tuple, tuple[Layout | None, list]] = {}
    for i, (delta_id, data) in enumerate(blobs):
        pos = i if positions is None else positions[i]
        where = f"delta {delta_id[:16]}"
        if is_packed(data):
            meta, layout, payload = read_packed(data, where, manifest)
            key: tuple = ("packed", layout.specs)
            item: object = payload
        else:
            d = delta_from_bytes(data, where, manifest, for_training=True)
            meta, layout, item = d.meta, None, d
            key = ("raw", tuple((n, t.shape) for n, t in sorted(d.tensors.items())))
        _, bucket = buckets.setdefault(key, (layout, []))
        bucket.append((pos, where, meta, item))
        if len(bucket) >= size:
            yield _chunk(bucket, layout)
            del buckets[key]
    for layout, bucket in buckets.values():
        yield _chunk(bucket, layout)
