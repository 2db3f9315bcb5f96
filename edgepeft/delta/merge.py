"""Aggregate deltas in each method's own space, streaming, and compare two deltas.

Each method declares its aggregation space (``Method.to_space``/``from_space``): for LoRA the weighted
mean is taken of ΔW = s·B@A per module, not of A and B separately (the mean of products is not the
product of means), then re-factored to a fixed rank by truncated SVD; vectors (bias, head, IA3) are
averaged as they are. Memory is one float64 accumulator per space part, whatever the number of
deltas, so the hub can stream thousands from disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from edgepeft.delta.format import Delta, DeltaMeta, check_structure
from edgepeft.errors import DeltaError
from edgepeft import methods
from edgepeft.frozen import BaseWeights
from edgepeft.methods.lora import refactor  # noqa: F401  (re-exported: the hub and tests use it from here)
from edgepeft.names import slot_name, split_slot_name


@dataclass
class MergeReport:
    """What a merge did: inputs, total weight, output rank and scale, per-module re-factoring error."""

    count: int
    total_weight: float
    rank: int
    scale: float
    errors: dict[str, float] = field(default_factory=dict)  # module -> ||ΔW - s·B@A||_F / ||ΔW||_F


def base_of(method: methods.Method, module: str, base: BaseWeights | None) -> np.ndarray | None:
    """The module's frozen weight for a method that aggregates against it (DoRA), else None."""
    return base(module) if method.needs_base and base is not None else None


def space_parts(d: Delta, base: BaseWeights | None = None) -> dict[str, np.ndarray]:
    """Every module's update in its method's aggregation space (ΔW for LoRA, the tensor itself for bias and head slots).
    ``base``: the bundle's frozen weights, for methods that need them (DoRA); they refuse without."""
    out: dict[str, np.ndarray] = {}
    for module, groups in methods.by_module(d.tensors).items():
        for method, kinds in groups.items():
            out.update(method.to_space(module, {k: d.tensors[n] for k, n in kinds.items()}, d.scale, base_of(method, module, base)))
    return out


def space_parts_factored(d: Delta, base: BaseWeights | None = None
                         ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """:func:`space_parts` with the matrix-product parts (LoRA's ΔW = s·B @ A) left as their two factors."""
    plain: dict[str, np.ndarray] = {}
    factored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, groups in methods.by_module(d.tensors).items():
        for method, kinds in groups.items():
            p, f = method.to_space_factored(module, {k: d.tensors[n] for k, n in kinds.items()}, d.scale,
                                            base_of(method, module, base))
            plain.update(p)
            factored.update(f)
    return plain, factored


def from_space_parts(first: Delta, space: dict[str, np.ndarray], rank: int, scale: float,
                     base: BaseWeights | None = None, pool_map: Callable = map) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Slots back from space parts shaped like ``first``'s; (tensors, per re-factored module its relative error).
    ``pool_map``: how the modules are mapped (threads: the SVDs release the GIL)."""
    tensors: dict[str, np.ndarray] = {}
    errors: dict[str, float] = {}
    jobs = [(module, method, kinds) for module, groups in methods.by_module(first.tensors).items() for method, kinds in groups.items()]

    def one(job: tuple) -> tuple[dict[str, np.ndarray], float]:
        module, method, kinds = job
        w = base_of(method, module, base)
        mine = method.to_space(module, {k: first.tensors[n] for k, n in kinds.items()}, first.scale, w)
        return method.from_space(module, {k: space[k] for k in mine}, rank, scale, w)

    for (module, method, _), (out, err) in zip(jobs, pool_map(one, jobs)):
        tensors.update({slot_name(module, k): v for k, v in out.items()})
        if method.ranked:
            errors[module] = err
    return tensors, errors


def merged_meta(first: DeltaMeta, rank: int, scale: float, samples: int, count: int) -> DeltaMeta:
    """The meta of a merge of ``count`` deltas, the first with meta ``first``: its base, method and adapter, the output's
    rank (0: no LoRA factors) and alpha = scale * rank, the samples they carried."""
    return DeltaMeta(base_fingerprint=first.base_fingerprint, method=first.method, rank=rank, alpha=scale * rank,
                     adapter=first.adapter, samples=samples, creator="merge", extra={"merged_count": str(count)})


def is_ranked(d: Delta) -> bool:
    """True when some slot of ``d`` belongs to a method that carries the delta's rank (the LoRA family)."""
    return any(methods.owner(split_slot_name(n)[1]).ranked for n in d.tensors)


FLUSH_EVERY = 32  # at most this many deltas' factors are concatenated into one product per module


class _Accumulator:
    """Running weighted sums of every module's update in its method's aggregation space.

    A product part (LoRA's ΔW = s·B @ A) is not formed per delta: the weighted factors of up to ``FLUSH_EVERY``
    deltas are kept and summed as one product, Σ wᵢ Bᵢ Aᵢ = [w₁B₁ … wₖBₖ] @ [A₁; …; Aₖ]. The flops are the same, but
    one large matrix product runs far faster than k small ones each followed by a d x d addition. A part's kept
    factors never outgrow its sum, so memory stays at most twice the accumulators, whatever the number of deltas.
    """

    def __init__(self, first: Delta, base: BaseWeights | None) -> None:
        self.first = first
        self.base = base
        self.slots = set(first.tensors)
        self.ranked = is_ranked(first)
        self.sums = {k: np.zeros(v.shape) for k, v in space_parts(first, base).items()}
        self.pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.count, self.total, self.samples, self.max_rank = 0, 0.0, 0, 0

    def flush(self, key: str | None = None) -> None:
        """Add the kept factors' products (of ``key``, or of every part) to the sums."""
        for k in [key] if key is not None else list(self.pending):
            pairs = self.pending.pop(k, [])
            if pairs:
                self.sums[k] += np.concatenate([l for l, _ in pairs], 1) @ np.concatenate([r for _, r in pairs], 0)

    def add(self, d: Delta, w: float) -> None:
        where = f"delta #{self.count + 1} ({d.meta.adapter} v{d.meta.version})"
        check_structure(d, where)
        first = self.first.meta
        if d.meta.base_fingerprint != first.base_fingerprint:
            raise DeltaError(f"{where}: is for base {d.meta.base_fingerprint[:16]}, the first delta for {first.base_fingerprint[:16]}")
        if set(d.tensors) != self.slots:
            missing, extra = sorted(self.slots - set(d.tensors)), sorted(set(d.tensors) - self.slots)
            raise DeltaError(f"{where}: slots differ from the first delta (missing {missing}, extra {extra})")
        if not (math.isfinite(w) and w >= 0):
            raise DeltaError(f"{where}: weight {w} must be finite and >= 0")
        plain, factored = space_parts_factored(d, self.base)
        for k, v in plain.items():
            acc = self.sums.get(k)
            if acc is None or v.shape != acc.shape:
                raise DeltaError(f"{where}: {k!r} has shape {v.shape}, the first delta's {None if acc is None else acc.shape}")
            acc += w * v
        for k, (left, right) in factored.items():
            acc = self.sums.get(k)
            if acc is None or (left.shape[0], right.shape[1]) != acc.shape or left.shape[1] != right.shape[0]:
                raise DeltaError(f"{where}: {k!r} has factors {left.shape} @ {right.shape}, the first delta's part is "
                                 f"{None if acc is None else acc.shape}")
            kept = self.pending.setdefault(k, [])
            kept.append((w * left, right))
            if len(kept) >= FLUSH_EVERY or sum(l.size + r.size for l, r in kept) >= acc.size:
                self.flush(k)
        self.count += 1
        self.total += w
        self.samples += d.meta.samples
        self.max_rank = max(self.max_rank, d.meta.rank if self.ranked else 0)


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


def merge(
    deltas: Iterable[Delta | tuple[Delta, float]],
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    scale: float | None = None,
    base: BaseWeights | None = None,
    step: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> tuple[Delta, MergeReport]:
    """Weighted mean of deltas (weights default to meta.samples), LoRA re-factored to ``rank`` in ΔW space.

    ``deltas`` may be any iterable (a generator reading files keeps memory flat) of deltas or
    (delta, weight) pairs. ``rank`` defaults to the largest input rank, ``scale`` (the output's
    alpha/rank) to the first delta's; the output has alpha = scale * rank. ``base``: the bundle's frozen
    weights (``edgepeft.frozen``), needed by methods whose space depends on them (DoRA). ``step``: maps the mean's
    space parts to the output's before re-factoring (the hub's server optimizer, ``edgepeft.hub.server_step``).
    """
    acc = None
    for d, w in _pairs(deltas, weights):
        if acc is None:
            acc = _Accumulator(d, base)
        acc.add(d, w)
    if acc is None:
        raise DeltaError("merge: no deltas given")
    acc.flush()
    if acc.total <= 0:
        raise DeltaError("merge: weights sum to 0 (every delta has samples=0?); pass explicit weights")
    out_rank = acc.max_rank if rank is None else int(rank)
    out_scale = acc.first.scale if scale is None else float(scale)
    if acc.ranked and (out_rank < 1 or not (math.isfinite(out_scale) and out_scale > 0)):
        raise DeltaError(f"merge: need rank >= 1 and scale > 0 for LoRA output, got rank {out_rank}, scale {out_scale}")
    report = MergeReport(acc.count, acc.total, out_rank if acc.ranked else 0, out_scale)
    mean = {k: v / acc.total for k, v in acc.sums.items()}
    tensors, report.errors = from_space_parts(acc.first, step(mean) if step else mean, out_rank, out_scale, base)
    return Delta(tensors, merged_meta(acc.first.meta, report.rank, out_scale, acc.samples, acc.count)), report


def _compare(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    d = x.astype(np.float64) - y.astype(np.float64)
    max_abs = float(np.abs(d).max(initial=0.0))
    ny = float(np.linalg.norm(y))
    nd = float(np.linalg.norm(d))
    return max_abs, nd / ny if ny > 0 else (0.0 if nd == 0 else math.inf)


def diff(a: Delta, b: Delta, base: BaseWeights | None = None) -> dict[str, tuple[float, float]]:
    """Per key (max |a - b|, ||a - b||_F / ||b||_F): every slot with equal shapes, and each method's space part
    that is not a slot (``<module>:dW`` per LoRA module).

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
    pa, pb = space_parts(a, base), space_parts(b, base)
    for k in sorted(pa):
        if k not in out and k in pb and pa[k].shape == pb[k].shape:  # the update of a re-factored pair
            out[k] = _compare(pa[k], pb[k])
    return out
