"""Aggregate deltas in the space of the full update, streaming, and compare two deltas.

For LoRA the weighted mean is taken of ΔW = s·B@A per module, not of A and B separately (the mean of
products is not the product of means), then re-factored to a fixed rank by truncated SVD. Memory is
one float64 (out, in) accumulator per LoRA module plus one per other slot, whatever the number of
deltas, so the hub can stream thousands from disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from edgepeft.delta.format import Delta, DeltaMeta, check_structure
from edgepeft.errors import DeltaError
from edgepeft.names import LORA_A, LORA_B, slot_name, split_slot_name


@dataclass
class MergeReport:
    """What a merge did: inputs, total weight, output rank and scale, per-module re-factoring error."""

    count: int
    total_weight: float
    rank: int
    scale: float
    errors: dict[str, float] = field(default_factory=dict)  # module -> ||ΔW - s·B@A||_F / ||ΔW||_F


class _Accumulator:
    """Running weighted sums of ΔW per LoRA module and of every other slot."""

    def __init__(self, first: Delta) -> None:
        self.first = first.meta
        self.slots = set(first.tensors)
        self.modules = first.lora_modules()
        self.dw = {m: np.zeros((first.tensors[slot_name(m, LORA_B)].shape[0], first.tensors[slot_name(m, LORA_A)].shape[1])) for m in self.modules}
        self.other = {n: np.zeros(t.shape) for n, t in first.tensors.items() if split_slot_name(n)[1] not in (LORA_A, LORA_B)}
        self.count, self.total, self.samples, self.max_rank = 0, 0.0, 0, 0

    def add(self, d: Delta, w: float) -> None:
        where = f"delta #{self.count + 1} ({d.meta.adapter} v{d.meta.version})"
        check_structure(d, where)
        if d.meta.base_fingerprint != self.first.base_fingerprint:
            raise DeltaError(f"{where}: is for base {d.meta.base_fingerprint[:16]}, the first delta for {self.first.base_fingerprint[:16]}")
        if set(d.tensors) != self.slots:
            missing, extra = sorted(self.slots - set(d.tensors)), sorted(set(d.tensors) - self.slots)
            raise DeltaError(f"{where}: slots differ from the first delta (missing {missing}, extra {extra})")
        if not (math.isfinite(w) and w >= 0):
            raise DeltaError(f"{where}: weight {w} must be finite and >= 0")
        for m, acc in self.dw.items():
            a, b = d.tensors[slot_name(m, LORA_A)], d.tensors[slot_name(m, LORA_B)]
            if (b.shape[0], a.shape[1]) != acc.shape:
                raise DeltaError(f"{where}: module {m!r} is {b.shape[0]}x{a.shape[1]}, the first delta's is {acc.shape[0]}x{acc.shape[1]}")
            acc += (w * d.scale) * (b.astype(np.float64) @ a.astype(np.float64))
        for n, acc in self.other.items():
            if d.tensors[n].shape != acc.shape:
                raise DeltaError(f"{where}: tensor {n!r} has shape {d.tensors[n].shape}, the first delta's {acc.shape}")
            acc += w * d.tensors[n]
        self.count += 1
        self.total += w
        self.samples += d.meta.samples
        self.max_rank = max(self.max_rank, d.meta.rank if self.modules else 0)


def _pairs(deltas: Iterable[Delta | tuple[Delta, float]], weights: Sequence[float] | None) -> Iterable[tuple[Delta, float]]:
    it = iter(deltas)
    ws = None if weights is None else iter(weights)
    for item in it:
        if isinstance(item, tuple):
            if ws is not None:
                raise DeltaError("merge: pass weights either with each delta or as `weights`, not both")
            d, w = item
        elif ws is not None:
            w = next(ws, None)
            if w is None:
                raise DeltaError("merge: fewer weights than deltas")
            d = item
        else:
            d, w = item, item.meta.samples
        yield d, float(w)
    if ws is not None and next(ws, None) is not None:
        raise DeltaError("merge: more weights than deltas")


def refactor(dw: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(A (rank, in), B (out, rank), relative error) with scale·B@A the best rank-``rank`` fit of ``dw``."""
    out_f, in_f = dw.shape
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    k = min(rank, s.size)
    a = np.zeros((rank, in_f))
    b = np.zeros((out_f, rank))
    root = np.sqrt(s[:k] / scale)
    a[:k] = root[:, None] * vt[:k]
    b[:, :k] = u[:, :k] * root
    # Directions with no signal would leave A and B both zero there, where gradients vanish and training
    # from this version could never use them: give A the unit singular direction at kaiming-init norm
    # (1/sqrt(3)) and keep B zero, which leaves ΔW unchanged.
    dead = np.flatnonzero(s[:k] <= (s[0] if s.size else 0.0) * 1e-7)
    a[dead] = vt[dead] / math.sqrt(3.0)
    b[:, dead] = 0.0
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    norm = np.linalg.norm(dw)
    err = np.linalg.norm(dw - scale * (b32.astype(np.float64) @ a32.astype(np.float64)))
    return a32, b32, float(err / norm) if norm > 0 else float(err)


def merge(
    deltas: Iterable[Delta | tuple[Delta, float]],
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    scale: float | None = None,
) -> tuple[Delta, MergeReport]:
    """Weighted mean of deltas (weights default to meta.samples), LoRA re-factored to ``rank`` in ΔW space.

    ``deltas`` may be any iterable (a generator reading files keeps memory flat) of deltas or
    (delta, weight) pairs. ``rank`` defaults to the largest input rank, ``scale`` (the output's
    alpha/rank) to the first delta's; the output has alpha = scale * rank.
    """
    acc = None
    for d, w in _pairs(deltas, weights):
        if acc is None:
            acc = _Accumulator(d)
        acc.add(d, w)
    if acc is None:
        raise DeltaError("merge: no deltas given")
    if acc.total <= 0:
        raise DeltaError("merge: weights sum to 0 (every delta has samples=0?); pass explicit weights")
    out_rank = acc.max_rank if rank is None else int(rank)
    out_scale = acc.first.scale if scale is None else float(scale)
    if acc.modules and (out_rank < 1 or not (math.isfinite(out_scale) and out_scale > 0)):
        raise DeltaError(f"merge: need rank >= 1 and scale > 0 for LoRA output, got rank {out_rank}, scale {out_scale}")
    tensors: dict[str, np.ndarray] = {}
    report = MergeReport(acc.count, acc.total, out_rank if acc.modules else 0, out_scale)
    for m, dw in acc.dw.items():
        a, b, err = refactor(dw / acc.total, out_rank, out_scale)
        tensors[slot_name(m, LORA_A)], tensors[slot_name(m, LORA_B)] = a, b
        report.errors[m] = err
    for n, s in acc.other.items():
        tensors[n] = (s / acc.total).astype(np.float32)
    f = acc.first
    meta = DeltaMeta(
        base_fingerprint=f.base_fingerprint,
        method=f.method,
        rank=report.rank,
        alpha=out_scale * report.rank,
        adapter=f.adapter,
        samples=acc.samples,
        creator="merge",
        extra={"merged_count": str(acc.count)},
    )
    return Delta(tensors, meta), report


def _compare(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    d = x.astype(np.float64) - y.astype(np.float64)
    max_abs = float(np.abs(d).max(initial=0.0))
    ny = float(np.linalg.norm(y))
    nd = float(np.linalg.norm(d))
    return max_abs, nd / ny if ny > 0 else (0.0 if nd == 0 else math.inf)


def diff(a: Delta, b: Delta) -> dict[str, tuple[float, float]]:
    """Per key (max |a - b|, ||a - b||_F / ||b||_F): every slot with equal shapes, and ``<module>:dW`` per LoRA module.

    The ΔW rows compare the effective update s·B@A, which is what matters: A and B themselves are only
    defined up to an invertible r×r mixing (a merge or re-factoring changes them, not ΔW).
    """
    if set(a.tensors) != set(b.tensors):
        only_a, only_b = sorted(set(a.tensors) - set(b.tensors)), sorted(set(b.tensors) - set(a.tensors))
        raise DeltaError(f"diff: slot sets differ (only in first: {only_a}; only in second: {only_b})")
    out = {}
    for n in sorted(a.tensors):
        if a.tensors[n].shape == b.tensors[n].shape:
            out[n] = _compare(a.tensors[n], b.tensors[n])
    for m in a.lora_modules():
        out[f"{m}:dW"] = _compare(a.delta_w(m), b.delta_w(m))
    return out
