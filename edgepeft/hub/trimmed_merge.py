"""The coordinate-wise trimmed mean of one round's deltas in each method's space (ΔW for LoRA), one delta at a time:
the path of methods the chunked merge (``stream_merge``) does not take (DoRA, VeRA, ...).

Over the deltas (``trimmed_merge``, a round of at most ``RobustOptions.buckets``): every coordinate needs every
delta's value, so the deltas are stacked (n, coordinates) a slice of the space at a time, in as many passes over them
as ``memory_mb`` needs; passes grow with n and each reads every delta, so the cost grows with n². Over bucket means
(``bucketed_merge``, a larger round): one pass, B bucket sums (``hub/buckets.py``), linear in n.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from edgepeft.delta.format import Delta
from edgepeft.delta.merge import from_space_parts, is_ranked, merged_meta, space_parts
from edgepeft.errors import HubError
from edgepeft.frozen import BaseWeights
from edgepeft.hub import buckets
from edgepeft.hub.robust import trimmed_mean

Pairs = Callable[[], Iterator[tuple[Delta, float]]]  # a fresh pass over (delta, weight)
Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # the mean's space parts -> the version's


def trimmed_merge(pairs: Pairs, n: int, trim: float, rank: int, scale: float, memory_mb: float,
                   base: BaseWeights | None, server: Step | None = None) -> tuple[Delta, dict[str, Any]]:
    """Coordinate-wise trimmed mean in ΔW space, in as many passes over the deltas as the memory budget needs."""
    first, _ = next(pairs())
    keys = [(k, v.shape) for k, v in space_parts(first, base).items()]  # each method's space (ΔW for LoRA)
    # numbers per delta per pass; ~40 bytes each: the float32 stack, argsort indices, kept values and weights
    budget = max(1, int(memory_mb * 2**20) // (40 * max(n, 1)))
    chunks: list[list[tuple[str, int, int]]] = [[]]  # passes of (key, row_lo, row_hi)
    used = 0
    for key, shape in keys:
        rows, width = (shape[0], int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1)
        step = max(1, budget // max(width, 1))
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            if used and used + (hi - lo) * width > budget:
                chunks.append([])
                used = 0
            chunks[-1].append((key, lo, hi))
            used += (hi - lo) * width
    result = {k: np.zeros(shape) for k, shape in keys}  # the same accumulators merge keeps: flat in n
    samples, weights_total = 0, 0.0
    for chunk in chunks:
        width = sum((hi - lo) * (int(np.prod(result[k].shape[1:], dtype=np.int64)) if result[k].ndim > 1 else 1) for k, lo, hi in chunk)
        stack = np.zeros((n, width), np.float32)  # (n, coordinates of this pass)
        weights = np.zeros(n)
        count = 0
        for i, (d, w) in enumerate(pairs()):
            if i >= n:
                raise HubError("aggregation: more deltas than claimed")
            weights[i] = w
            col = 0
            parts = space_parts(d, base)
            for key, lo, hi in chunk:
                block = parts[key].reshape(result[key].shape[0], -1)[lo:hi]
                stack[i, col:col + block.size] = block.ravel()
                col += block.size
            if chunk is chunks[0]:
                samples += d.meta.samples
            count = i + 1
        if count != n:
            raise HubError(f"aggregation: read {count} deltas, claimed {n}")
        weights_total = float(weights.sum())
        mean = trimmed_mean(stack, weights, trim)
        col = 0
        for key, lo, hi in chunk:
            target = result[key].reshape(result[key].shape[0], -1)
            size = (hi - lo) * target.shape[1]
            target[lo:hi] = mean[col:col + size].reshape(hi - lo, -1)
            col += size
    version, error = _version(first, server(result) if server else result, rank, scale, base, samples, n)
    return version, {"total_weight": weights_total, "passes": len(chunks), "trimmed": buckets.report(n, n, trim),
                     "max_refactor_error": error}


def bucketed_merge(pairs: Pairs, n: int, trim: float, buckets_: int, rank: int, scale: float, base: BaseWeights | None,
                   server: Step | None = None) -> tuple[Delta, dict[str, Any]]:
    """The trimmed mean over ``buckets_`` bucket means (``hub/buckets.py``) in one pass, one delta at a time: the
    chunked path's rule for the methods it does not take. ``pairs`` come in the bucketing order (``buckets.shuffled``)."""
    groups = buckets.count(n, buckets_)
    sums: dict[str, np.ndarray] = {}
    totals = np.zeros(groups)
    first: Delta | None = None
    samples, count = 0, 0
    for i, (d, w) in enumerate(pairs()):
        if i >= n:
            raise HubError("aggregation: more deltas than claimed")
        g = int(buckets.of(np.array([i]), n, groups)[0])
        for key, v in space_parts(d, base).items():
            if key not in sums:
                sums[key] = np.zeros((groups, *v.shape), np.float32)  # as the chunked path's bucket sums
            sums[key][g] += w * v
        totals[g] += w
        samples += d.meta.samples
        first = first or d
        count = i + 1
    if count != n or first is None:
        raise HubError(f"aggregation: read {count} deltas, claimed {n}")
    mean = {k: buckets.trimmed_across(v, totals, trim) for k, v in sums.items()}
    version, error = _version(first, server(mean) if server else mean, rank, scale, base, samples, n)
    return version, {"total_weight": float(totals.sum()), "passes": 1, "trimmed": buckets.report(n, buckets_, trim),
                     "max_refactor_error": error}


def _version(first: Delta, space: dict[str, np.ndarray], rank: int, scale: float, base: BaseWeights | None,
             samples: int, n: int) -> tuple[Delta, float]:
    """The version from the (trimmed) mean's space parts, re-factored at ``rank`` and ``scale``; its largest refactor error."""
    tensors, errors = from_space_parts(first, space, rank, scale, base)
    meta = merged_meta(first.meta, rank if is_ranked(first) else 0, scale, samples, n)
    return Delta(tensors, meta), max(errors.values(), default=0.0)
