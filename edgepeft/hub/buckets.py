"""The trimmed mean over buckets (Karimireddy, He, Jaggi 2022, "Byzantine-robust learning on heterogeneous datasets
via bucketing"): which deltas share a bucket, and the coordinate-wise trimmed mean across the bucket means.

A round's n deltas are put in a deterministic shuffled order (sha256 of the version they were merged after and each
delta's content id) and cut into B runs of ⌊n/B⌋ or ⌈n/B⌉ consecutive deltas, one run a bucket. The same deltas and
options give the same buckets, so a rebuilt or recovered version is the same; with B >= n every delta is a bucket of its
own, and the result is the per-delta trimmed mean (``trimmed_merge``). Memory is B bucket sums of the aggregation space,
whatever n.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

from edgepeft.hub.robust import trim_count, trimmed_mean

BLOCK = 1 << 16  # coordinates per trimmed-mean block: B x 64k float32 values, sorted indices and weights (~25 MB at B=32)


def shuffled(ids: list[str], after: int) -> list[int]:
    """Positions of ``ids`` in the bucketing order: sorted by sha256 of ``after`` (the latest published version) and
    the id, so the order changes every round but not when a version is rebuilt, nor with the order deltas were claimed."""
    key = [hashlib.sha256(f"{after}:{i}".encode()).digest() for i in ids]
    return sorted(range(len(ids)), key=lambda p: (key[p], ids[p]))


def of(positions: np.ndarray, n: int, buckets: int) -> np.ndarray:
    """The bucket of each position in the shuffled order: B runs of consecutive positions, sizes differing by at most
    one; with B >= n, position p is bucket p (each delta alone)."""
    return (np.asarray(positions, np.int64) * min(buckets, n)) // n


def count(n: int, buckets: int) -> int:
    """The number of non-empty buckets for n deltas."""
    return min(buckets, n)


def trimmed_across(sums: np.ndarray, totals: np.ndarray, trim: float, pool_map: Callable = map) -> np.ndarray:
    """Coordinate-wise trimmed mean of the bucket means ``sums[g] / totals[g]`` weighted by ``totals`` (the buckets'
    total weights), in blocks of ``BLOCK`` coordinates (``pool_map``: how the blocks are mapped, e.g. on threads).
    ``sums``: (B, *shape); buckets of total weight 0 are left out."""
    keep = totals > 0
    if not keep.all():  # (a copy: only when some bucket weighs 0)
        sums, totals = sums[keep], totals[keep]
    b = sums.shape[0]
    flat = sums.reshape(b, -1)
    out = np.empty(flat.shape[1])
    inverse = (1.0 / totals)[:, None]

    def block(lo: int) -> None:
        means = (flat[:, lo:lo + BLOCK] * inverse).astype(np.float32)  # as the per-delta stack holds values: float32
        out[lo:lo + BLOCK] = _trimmed_columns(means, totals, trim)

    list(pool_map(block, range(0, flat.shape[1], BLOCK)))
    return out.reshape(sums.shape[1:])


def _trimmed_columns(values: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    """``robust.trimmed_mean`` of float32 ``values`` (n, m), the same numbers, several times faster: each column's
    order comes from sorting 64-bit keys, the value's bits mapped to an unsigned order above its row, which orders
    equal values by row as the stable argsort does; a plain sort is vectorized where an argsort is not, and the kept
    values are read back from their keys."""
    n = values.shape[0]
    if values.dtype != np.float32:
        return trimmed_mean(values, weights, trim)
    k = trim_count(n, trim)
    m = values.shape[1]
    rows = np.ascontiguousarray(values.T) + np.float32(0.0)  # (m, n); -0.0 becomes 0.0: equal values, one key
    halves = np.empty((m, n, 2), np.uint32)  # little-endian uint64 keys: (row, order of the value)
    halves[:, :, 0] = np.arange(n, dtype=np.uint32)
    flip = (rows.view(np.int32) >> 31).view(np.uint32)  # negative: all bits; else none ...
    flip |= np.uint32(1 << 31)  # ... and the sign bit: unsigned order is the floats' order
    np.bitwise_xor(rows.view(np.uint32), flip, out=halves[:, :, 1])
    keys = halves.view(np.uint64).reshape(m, n)
    keys.sort(axis=1)
    middle = halves[:, k:n - k]  # (m, n - 2k, 2) the kept, in order
    order = middle[:, :, 1]
    back = (order.view(np.int32) >> 31).view(np.uint32)  # the top bit set (a value >= 0): flip that bit; else all
    back = ~back | np.uint32(1 << 31)
    v = (order ^ back).view(np.float32).astype(np.float64)
    w = np.asarray(weights, dtype=np.float64)[middle[:, :, 0]]
    total = w.sum(axis=1)
    return np.divide((v * w).sum(axis=1), total, out=np.zeros(m), where=total > 0)


def report(n: int, buckets: int, trim: float) -> dict[str, object]:
    """What a version's trimmed mean was taken over, for its report: deltas (n <= B) or buckets, how many, their sizes,
    and how many were cut at each end of every coordinate."""
    g = count(n, buckets)
    return {"over": "deltas" if g == n else "buckets", "buckets": g, "deltas_per_bucket": [n // g, -(-n // g)],
            "cut_each_end": trim_count(g, trim)}
