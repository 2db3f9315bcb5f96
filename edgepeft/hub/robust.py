"""Robust aggregation as small pure functions over deltas: update norms, norm clipping, trimmed means.

A device's *update* is its delta minus the version it trained from, measured in each method's own
aggregation space (ΔW = s·B@A per LoRA module, the tensor itself for bias and head slots).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from edgepeft.delta.format import Delta, replace_meta
from edgepeft.errors import HubError
from edgepeft import methods
from edgepeft.delta.merge import base_of, is_ranked, space_parts
from edgepeft.frozen import BaseWeights
from edgepeft.hub import server_step
from edgepeft.names import slot_name


@dataclass(frozen=True)
class RobustOptions:
    """How an aggregation defends against outlier devices, and how far its version moves. On by default: each update
    clipped to the median update norm of its version, then a coordinate-wise 20 % trimmed mean (clipping alone stops a
    scaled delta, not a sign-flipped one of typical norm: tests/test_fleet_robust.py); ``{"clip_median": None, "trim": 0}``
    is the plain weighted mean.

    The rule for the trimmed mean: over the deltas in a round of at most ``buckets`` (B = 32) deltas, over B bucket means
    in a larger one (Karimireddy, He, Jaggi 2022; ``hub/buckets.py``: the clipped deltas in an order shuffled by the round
    and their content ids, cut into B runs, each run's weighted mean a bucket weighing its deltas' total weight). Its
    cost then grows with n, not n², and its memory is B sums of the aggregation space (7 MB each for 12 LoRA modules of
    384 x 384) whatever n; with B >= n it is the per-delta trimmed mean. The version's report says which (``trimmed``).

    ``server_lr`` and ``server_momentum`` are the server step (``server_step``, FedAvgM), off by default: the version is
    the (robust) mean."""

    clip_norm: float | None = None  # clip each device's update to this Frobenius norm (over every slot, ΔW space)
    clip_median: float | None = 1.0  # without clip_norm: clip to this multiple of the round's median update norm
    #   (an adaptive bound, the median quantile of Andrew et al. 2021 re-estimated every version; None: off)
    trim: float = 0.2  # coordinate-wise trimmed mean: fraction of values cut at each end (0 <= trim < 0.5; none below 5 deltas)
    buckets: int = 32  # the trimmed mean of a round of more deltas is taken over this many bucket means
    max_samples: int | None = None  # cap on one delta's aggregation weight (its meta.samples)
    memory_mb: float = 256.0  # working set of the per-delta trimmed mean (DoRA, VeRA, ...): more deltas, more passes
    server_lr: float = 1.0  # the version moves this fraction of the way from its parent to the (robust) mean
    server_momentum: float = 0.0  # ... plus this times what the parent moved from its own parent (FedAvgM's beta)

    def __post_init__(self) -> None:
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise HubError(f"clip_norm must be a positive number, got {self.clip_norm}")
        if self.clip_median is not None and not (math.isfinite(self.clip_median) and self.clip_median > 0):
            raise HubError(f"clip_median must be a positive number, got {self.clip_median}")
        if not (0.0 <= self.trim < 0.5):
            raise HubError(f"trim must be in [0, 0.5), got {self.trim}")
        if not (isinstance(self.buckets, int) and self.buckets >= 1):
            raise HubError(f"buckets must be a whole number >= 1, got {self.buckets!r}")
        if self.trim > 0 and trim_count(self.buckets, self.trim) < 1:
            raise HubError(f"trim {self.trim} of {self.buckets} buckets cuts none; use at least {math.ceil(1 / self.trim)} buckets")
        if self.max_samples is not None and self.max_samples < 1:
            raise HubError(f"max_samples must be >= 1, got {self.max_samples}")
        if not (math.isfinite(self.memory_mb) and self.memory_mb > 0):
            raise HubError(f"memory_mb must be > 0, got {self.memory_mb}")
        server_step.check(self.server_lr, self.server_momentum)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "RobustOptions":
        """Options from JSON; unknown keys are refused by name."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise HubError(f"unknown aggregation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise HubError(f"bad aggregation options ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _update_parts(delta: Delta, parent: Delta | None, base: BaseWeights | None) -> dict[str, np.ndarray]:
    """Per space part (``<module>:dW`` for LoRA modules, the slot name otherwise), the update in its method's space."""
    mine = space_parts(delta, base)
    if parent is None:
        return mine
    theirs = space_parts(parent, base)
    return {k: v - theirs[k] for k, v in mine.items()}


def update_norm(delta: Delta, parent: Delta | None, base: BaseWeights | None = None) -> float:
    """Frobenius norm of ``delta - parent`` over every slot, each in its method's space (parent None = neutral)."""
    return float(math.sqrt(sum(float(np.sum(u * u)) for u in _update_parts(delta, parent, base).values())))


def clip_update(delta: Delta, parent: Delta | None, max_norm: float, base: BaseWeights | None = None) -> tuple[Delta, float]:
    """(parent + λ·(delta - parent) with λ = min(1, max_norm / norm), the update's norm).

    Exact in each method's space (``Method.lerp``); for LoRA without forming ΔW, so the rank becomes the
    sum of both ranks, which a merge re-factors.
    """
    norm = update_norm(delta, parent, base)
    if norm <= max_norm:
        return delta, norm
    lam = max_norm / norm
    tensors: dict[str, np.ndarray] = {}
    scales = (delta.scale, parent.scale if parent is not None else delta.scale)
    for module, groups in methods.by_module(delta.tensors).items():
        for method, kinds in groups.items():
            mine = {k: delta.tensors[n] for k, n in kinds.items()}
            theirs = None if parent is None else {k: parent.tensors[n] for k, n in kinds.items()}
            tensors.update({slot_name(module, k): v for k, v in method.lerp(module, theirs, mine, lam, scales, base_of(method, module, base)).items()})
    if parent is None or not is_ranked(delta):
        return Delta(tensors, delta.meta), norm
    rank = delta.meta.rank + parent.meta.rank
    return replace_meta(Delta(tensors, delta.meta), rank=rank, alpha=delta.scale * rank), norm


def trimmed_mean(values: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    """Coordinate-wise trimmed mean of ``values`` (n, m): per column drop the ⌊trim·n⌋ lowest and highest,
    then the ``weights``-weighted mean of the rest. (m,) float64."""
    n = values.shape[0]
    k = trim_count(n, trim)
    order = np.argsort(values, axis=0, kind="stable")  # (n, m)
    kept = order[k:n - k]  # (n - 2k, m)
    v = np.take_along_axis(values, kept, axis=0).astype(np.float64)
    w = np.asarray(weights, dtype=np.float64)[kept]  # (n - 2k, m)
    total = w.sum(axis=0)
    return np.divide((v * w).sum(axis=0), total, out=np.zeros(values.shape[1]), where=total > 0)


def trim_count(n: int, trim: float) -> int:
    """How many of n values a trimmed mean cuts at each end: ⌊trim·n⌋, leaving at least one."""
    k = int(math.floor(trim * n))
    return (n - 1) // 2 if n - 2 * k < 1 else k
