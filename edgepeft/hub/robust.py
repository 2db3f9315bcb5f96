"""Robust aggregation as small pure functions over deltas: update norms, norm clipping, trimmed means.

A device's *update* is its delta minus the version it trained from, measured in the space of the full
update (ΔW = s·B@A per LoRA module, the tensor itself for bias and head slots).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from edgepeft.delta.format import Delta, replace_meta
from edgepeft.errors import HubError
from edgepeft.names import LORA_A, LORA_B, slot_name, split_slot_name


@dataclass(frozen=True)
class RobustOptions:
    """How an aggregation defends against outlier devices; the defaults are a plain weighted mean."""

    clip_norm: float | None = None  # clip each device's update to this Frobenius norm (over every slot, ΔW space)
    trim: float = 0.0  # coordinate-wise trimmed mean: fraction of values cut at each end (0 <= trim < 0.5)
    max_samples: int | None = None  # cap on one delta's aggregation weight (its meta.samples)
    memory_mb: float = 256.0  # working set of the trimmed mean; more deltas mean more passes, not more memory

    def __post_init__(self) -> None:
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise HubError(f"clip_norm must be a positive number, got {self.clip_norm}")
        if not (0.0 <= self.trim < 0.5):
            raise HubError(f"trim must be in [0, 0.5), got {self.trim}")
        if self.max_samples is not None and self.max_samples < 1:
            raise HubError(f"max_samples must be >= 1, got {self.max_samples}")
        if not (math.isfinite(self.memory_mb) and self.memory_mb > 0):
            raise HubError(f"memory_mb must be > 0, got {self.memory_mb}")

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


def _update_parts(delta: Delta, parent: Delta | None) -> dict[str, np.ndarray]:
    """Per key, the update in ΔW space: ``<module>:dW`` for LoRA modules, the slot name otherwise."""
    out = {}
    for m in delta.lora_modules():
        out[f"{m}:dW"] = delta.delta_w(m) - (parent.delta_w(m) if parent is not None else 0.0)
    for n, t in delta.tensors.items():
        if split_slot_name(n)[1] not in (LORA_A, LORA_B):
            out[n] = t.astype(np.float64) - (parent.tensors[n].astype(np.float64) if parent is not None else 0.0)
    return out


def update_norm(delta: Delta, parent: Delta | None) -> float:
    """Frobenius norm of ``delta - parent`` over every slot, LoRA measured as ΔW (parent None = zero)."""
    return float(math.sqrt(sum(float(np.sum(u * u)) for u in _update_parts(delta, parent).values())))


def clip_update(delta: Delta, parent: Delta | None, max_norm: float) -> tuple[Delta, float]:
    """(parent + λ·(delta - parent) with λ = min(1, max_norm / norm), the update's norm).

    Exact in ΔW space without forming ΔW: A' = [A_p; A], B' = [(1-λ)·(s_p/s)·B_p, λ·B] at the delta's
    scale s, so s·B'@A' = (1-λ)·ΔW_p + λ·ΔW. The rank is the sum of both ranks; merge re-factors it.
    """
    norm = update_norm(delta, parent)
    if norm <= max_norm:
        return delta, norm
    lam = max_norm / norm
    tensors: dict[str, np.ndarray] = {}
    modules = delta.lora_modules()
    for n, t in delta.tensors.items():
        if split_slot_name(n)[1] not in (LORA_A, LORA_B):
            base = parent.tensors[n] if parent is not None else np.zeros_like(t)
            tensors[n] = (base + lam * (t - base)).astype(np.float32)
    if parent is None:
        for m in modules:
            tensors[slot_name(m, LORA_A)] = delta.tensors[slot_name(m, LORA_A)]
            tensors[slot_name(m, LORA_B)] = (lam * delta.tensors[slot_name(m, LORA_B)]).astype(np.float32)
        return Delta(tensors, delta.meta), norm
    rank = delta.meta.rank + parent.meta.rank
    ratio = parent.scale / delta.scale
    for m in modules:
        a, b = slot_name(m, LORA_A), slot_name(m, LORA_B)
        tensors[a] = np.concatenate([parent.tensors[a], delta.tensors[a]], axis=0).astype(np.float32)
        tensors[b] = np.concatenate([(1 - lam) * ratio * parent.tensors[b], lam * delta.tensors[b]], axis=1).astype(np.float32)
    if not modules:
        return Delta(tensors, delta.meta), norm
    return replace_meta(Delta(tensors, delta.meta), rank=rank, alpha=delta.scale * rank), norm


def trimmed_mean(values: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    """Coordinate-wise trimmed mean of ``values`` (n, m): per column drop the ⌊trim·n⌋ lowest and highest,
    then the ``weights``-weighted mean of the rest. (m,) float64."""
    n = values.shape[0]
    k = int(math.floor(trim * n))
    if n - 2 * k < 1:
        k = (n - 1) // 2
    order = np.argsort(values, axis=0, kind="stable")  # (n, m)
    kept = order[k:n - k]  # (n - 2k, m)
    v = np.take_along_axis(values, kept, axis=0).astype(np.float64)
    w = np.asarray(weights, dtype=np.float64)[kept]  # (n - 2k, m)
    total = w.sum(axis=0)
    return np.divide((v * w).sum(axis=0), total, out=np.zeros(values.shape[1]), where=total > 0)
