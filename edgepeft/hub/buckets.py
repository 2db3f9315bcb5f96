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


def trimmed_across(sums: np.ndarray, totals: np.ndarray, trim: float) -> np.ndarray:
    """Coordinate-wise trimmed mean of the bucket means ``sums[g] / totals[g]`` weighted by ``totals`` (the buckets'
    total weights), in blocks of ``BLOCK`` coordinates. ``sums``: (B, *shape); buckets of total weight 0 are left out."""
    keep = totals > 0
    sums, totals = sums[keep], totals[keep]
    b = sums.shape[0]
    flat = sums.reshape(b, -1)
    out = np.empty(flat.shape[1])
    inverse = (1.0 / totals)[:, None]
    for lo in range(0, flat.shape[1], BLOCK):
        means = (flat[:, lo:lo + BLOCK] * inverse).astype(np.float32)  # as the per-delta stack holds values: float32
        out[lo:lo + BLOCK] = trimmed_mean(means, totals, trim)
    return out.reshape(sums.shape[1:])


def report(n: int, buckets: int, trim: float) -> dict[str, object]:
    """What a version's trimmed mean was taken over, for its report: deltas (n <= B) or buckets, how many, their sizes,
    and how many were cut at each end of every coordinate."""
    g = count(n, buckets)
    return {"over": "deltas" if g == n else "buckets", "buckets": g, "deltas_per_bucket": [n // g, -(-n // g)],
            "cut_each_end": trim_count(g, trim)}
