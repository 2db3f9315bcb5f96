"""Mixed LoRA ranks on one bundle: pad a lower-rank delta to the bundle's rank, cut it back, refit, rebase.

One bundle is exported at the fleet's largest rank R. A device that chose rank r < R trains that bundle's
graph with A's rows and B's columns past r set to zero: their gradients are exactly zero there
(∂L/∂B[:, j] has the factor A[j] and ∂L/∂A[j] the factor B[:, j]), and AdamW leaves a zero parameter
with a zero gradient at zero, so the padded run *is* a rank-r LoRA at the bundle's scale s = alpha/R,
and cutting the padding off loses nothing. The hub averages in ΔW space, so ranks mix exactly there,
and a version is refitted to each rank by truncated SVD (the best rank-r fit, Eckart-Young).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from edgepeft import methods
from edgepeft.delta.format import Delta
from edgepeft.delta.merge import from_space_parts, space_parts
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest
from edgepeft.methods.lora import LowRank
from edgepeft.names import split_slot_name


def bundle_rank(manifest: Manifest) -> int:
    """The rank every LoRA-family slot of the bundle was exported at (0: no such slot)."""
    ranks = {s.rank for s in manifest.slots if s.rank}
    if len(ranks) > 1:
        raise DeltaError(f"manifest: LoRA slots disagree on rank: {sorted(ranks)}")
    return ranks.pop() if ranks else 0


def _rank_axis(name: str) -> int | None:
    return methods.owner(split_slot_name(name)[1]).infer_axis(split_slot_name(name)[1])


def _with_rank(d: Delta, tensors: dict[str, np.ndarray], rank: int) -> Delta:
    return Delta(tensors, dataclasses.replace(d.meta, rank=rank, alpha=d.scale * rank))


def pad_rank(d: Delta, rank: int) -> Delta:
    """``d`` with its LoRA factors zero-padded to ``rank`` at the same scale (the same ΔW; trains as rank d.meta.rank)."""
    full = all(t.shape[a] == rank for n, t in d.tensors.items() if (a := _rank_axis(n)) is not None)
    if not d.meta.rank or (d.meta.rank == rank and full):  # AdaLoRA: meta.rank is init_r, its pruned modules hold fewer
        return d
    if d.meta.rank > rank:
        raise DeltaError(f"delta has rank {d.meta.rank}, above the bundle's {rank}; refit it to at most {rank}")

    def pad(n: str, t: np.ndarray, axis: int) -> np.ndarray:
        width = [(0, 0)] * t.ndim
        width[axis] = (0, rank - t.shape[axis])
        return np.pad(t, width).astype(np.float32)

    return _with_rank(d, _map_factors(d, pad), rank)


def cut_rank(d: Delta, rank: int, *, exact: bool = True) -> Delta:
    """Inverse of :func:`pad_rank`: the first ``rank`` factors; with ``exact``, refuses when the cut-off part is not zero."""
    if not d.meta.rank or d.meta.rank == rank:
        return d

    def cut(n: str, t: np.ndarray, axis: int) -> np.ndarray:
        keep, drop = np.split(t, [rank], axis=axis)
        if exact and np.any(drop):
            raise DeltaError(f"{n}: factors past rank {rank} are not zero; this delta has a higher rank than {rank}")
        return np.ascontiguousarray(keep)

    return _with_rank(d, _map_factors(d, cut), rank)


def _map_factors(d: Delta, fn: Callable[[str, np.ndarray, int], np.ndarray]) -> dict[str, np.ndarray]:
    """``d``'s tensors with ``fn(name, tensor, rank axis)`` applied to each LoRA factor; other slots as they are."""
    return {n: t if (axis := _rank_axis(n)) is None else fn(n, t, axis) for n, t in d.tensors.items()}


def refit(d: Delta, rank: int) -> tuple[Delta, float]:
    """(``d`` re-factored to ``rank`` by truncated SVD of each module's ΔW at the same scale, largest relative ΔW error)."""
    if not d.meta.rank or d.meta.rank == rank:
        return d, 0.0
    if any(methods.owner(split_slot_name(n)[1]).needs_base for n in d.tensors):
        raise DeltaError("refit: a method whose update depends on the base weights (DoRA) cannot change rank here")
    tensors, errors = from_space_parts(d, space_parts(d), rank, d.scale)
    return _with_rank(d, tensors, rank), max(errors.values(), default=0.0)


def rebase(d: Delta, start: Delta, parent: Delta) -> Delta:
    """``d - start + parent`` exactly: the update a device trained (from ``start``, the version it pulled at its rank)
    applied to the full-rank ``parent`` version. LoRA factors are stacked, not multiplied out: A' = [A_d; A_s; A_p],
    B' = [B_d, -(s_s/s)·B_s, (s_p/s)·B_p] at d's scale s, so the rank is the sum (a merge re-factors it)."""
    if set(d.tensors) != set(start.tensors) or set(d.tensors) != set(parent.tensors):
        raise DeltaError("rebase: the delta, its start and its parent have different slots")
    out: dict[str, np.ndarray] = {}
    s = d.scale
    for module, groups in methods.by_module(d.tensors).items():
        for method, kinds in groups.items():
            for kind, name in kinds.items():
                if not isinstance(method, LowRank):
                    out[name] = (d.tensors[name] - start.tensors[name] + parent.tensors[name]).astype(np.float32)
                elif method.needs_base:
                    raise DeltaError(f"rebase: {method.name} updates depend on the base weights; mixed ranks need plain LoRA")
                elif kind == method.a_kind:
                    out[name] = np.concatenate([d.tensors[name], start.tensors[name], parent.tensors[name]], 0)
                else:
                    out[name] = np.concatenate([d.tensors[name], -(start.scale / s) * start.tensors[name],
                                                (parent.scale / s) * parent.tensors[name]], 1).astype(np.float32)
    return _with_rank(d, out, d.meta.rank + start.meta.rank + parent.meta.rank)
