"""The hub's weighted mean in ΔW space over thousands of deltas: one matrix product per LoRA module and chunk.

Σᵢ cᵢ·sᵢ·Bᵢ@Aᵢ over a chunk of k deltas is [c₁s₁B₁ … cₖsₖBₖ] @ [A₁; …; Aₖ], one (d x kr) @ (kr x d) product: the
same flops as k small ones, at the BLAS library's large-matrix speed. Bias and head slots are a (k,) @ (k, n) product.
Clipping and mixed ranks need no ΔW per delta either. A delta trained from ``start`` (its parent version, or that
version refitted to the device's rank) on top of ``parent`` counts as ``parent + λ·(delta - start)``
(``mixed_ranks.measured_from_start``, ``robust.clip_update``): the versions' parts are summed once per version with
their total coefficient, and the update's norm comes from r x r Gram matrices,
‖s·B@A − W‖² = s²·Σ(BᵀB ∘ AAᵀ) − 2s·s_w·Σ(BᵀB_w ∘ A A_wᵀ) + ‖W‖²  (W = s_w·B_w@A_w).
The trimmed mean sums the deltas into B bucket sums instead of one (``hub/buckets.py``) and trims across them. Exact:
the differential test (tests/test_stream_merge.py) holds it to the per-delta merge, and the trimmed mean with B >= n to
the per-delta trimmed mean. Methods whose space is not a product or a plain slot (DoRA, VeRA, ...) keep
``aggregate``'s per-delta path.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import numpy as np

from edgepeft import methods
from edgepeft.delta.format import Delta, DeltaMeta
from edgepeft.delta.merge import from_space_parts, merged_meta, space_parts
from edgepeft.errors import HubError
from edgepeft.hub import buckets
from edgepeft.hub.delta_chunks import Chunk
from edgepeft.hub.limits import staleness_factor
from edgepeft.hub.robust import RobustOptions
from edgepeft.manifest import Manifest
from edgepeft.methods.base import Method
from edgepeft.methods.lora import LowRank

Chunks = Callable[[], Iterator[Chunk]]  # a fresh pass over the claimed deltas, in chunks
Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _is_product(m: Method) -> bool:
    """LoRA's space: ΔW = s·B@A and nothing else (its re-factoring and lerp are LowRank's own)."""
    t = type(m)
    return (isinstance(m, LowRank) and not m.needs_base and set(m.kinds) == {m.a_kind, m.b_kind}
            and t.to_space is LowRank.to_space and t.lerp is LowRank.lerp and t.from_space is LowRank.from_space)


def _is_plain(m: Method) -> bool:
    """A method averaged as its slots are (minus their neutral value): bias, head, IA3."""
    t = type(m)
    return (not m.needs_base and not m.ranked and t.to_space is Method.to_space and t.lerp is Method.lerp
            and t.from_space is Method.from_space)


def eligible(manifest: Manifest) -> bool:
    """True when this module merges the bundle's deltas (any options): every method LoRA or plain."""
    return all(_is_product(m) or _is_plain(m) for g in methods.by_module(s.name for s in manifest.slots).values() for m in g)


class Parts:
    """The bundle's aggregation space: LoRA modules as (key, B slot, A slot), plain slots as (key, slot, neutral value)."""

    def __init__(self, manifest: Manifest) -> None:
        self.products: list[tuple[str, str, str]] = []
        self.plain: list[tuple[str, str, float]] = []
        for module, groups in methods.by_module(s.name for s in manifest.slots).items():
            for m, kinds in groups.items():
                if _is_product(m):
                    self.products.append((f"{module}:dW", kinds[m.b_kind], kinds[m.a_kind]))  # type: ignore[attr-defined]
                else:
                    self.plain += [(name, name, float(m.fill(k))) for k, name in kinds.items()]


def _factors(d: Delta, parts: Parts) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per LoRA part of a version, (s·B, A) in float64."""
    return {key: (d.scale * d.tensors[b].astype(np.float64), d.tensors[a].astype(np.float64)) for key, b, a in parts.products}


class Starts:
    """The versions deltas are measured from: parsed once, with their space parts, factors and squared norm."""

    def __init__(self, parts: Parts, full: int, get: Callable[[int | None], Delta | None],
                 at_rank: Callable[[int, int], Delta | None]) -> None:
        self.parts, self.full, self.get, self.at_rank = parts, full, get, at_rank
        self.seen: dict[tuple[int, int], tuple[Delta, dict, dict, float]] = {}

    def keys(self, meta: DeltaMeta) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """(start, parent) of a delta as (version, rank) keys; (None, None): it is its own update."""
        parent = self.get(meta.parent)
        if parent is None:
            return None, None
        v = parent.meta.version
        whole = (v, parent.meta.rank)
        self._load(whole, parent)
        if not meta.rank or meta.rank == self.full:
            return whole, whole
        start = (v, meta.rank)
        if start not in self.seen:
            s = self.at_rank(v, meta.rank)
            if s is None:
                raise HubError(f"delta of rank {meta.rank} from v{v}: that version has no rank-{meta.rank} form")
            self._load(start, s)
        return start, whole

    def _load(self, key: tuple[int, int], d: Delta) -> None:
        if key not in self.seen:
            space = space_parts(d)
            products = float(sum(float(np.sum(space[k] ** 2)) for k, _, _ in self.parts.products))  # ‖W‖² of the ΔW parts
            self.seen[key] = (d, space, _factors(d, self.parts), products)


def _norms(chunk: Chunk, parts: Parts, starts: Starts, keys: list) -> np.ndarray:
    """‖delta − start‖ of each delta of the chunk, over every part of the aggregation space (float64 Gram matrices)."""
    k = len(chunk)
    sq = np.zeros(k)
    groups = {key: np.array([i for i, (s, _) in enumerate(keys) if s == key]) for key in {s for s, _ in keys}}
    scale = np.array([m.scale for m in chunk.metas])
    for key, b_name, a_name in parts.products:
        b = chunk.values(b_name).astype(np.float64) * scale[:, None, None]  # (k, d_out, r): s·B
        a = chunk.values(a_name).astype(np.float64)  # (k, r, d_in)
        sq += np.einsum("kij,kij->k", b.transpose(0, 2, 1) @ b, a @ a.transpose(0, 2, 1))
        for start, idx in groups.items():
            if start is None:
                continue
            sb, sa = starts.seen[start][2][key]  # s_w·B_w, A_w
            x = np.matmul(sb.T, b[idx])  # (k, r_w, r): (s_w·B_w)ᵀ (s·B)
            y = np.matmul(a[idx], sa.T)  # (k, r, r_w): A A_wᵀ
            sq[idx] -= 2 * np.einsum("ksr,krs->k", x, y)
    for key, name, fill in parts.plain:
        v = chunk.values(name).reshape(k, -1).astype(np.float64) - fill
        for start, idx in groups.items():
            if start is not None:
                v[idx] -= starts.seen[start][1][key].reshape(-1)
        sq += np.einsum("kn,kn->k", v, v)
    for start, idx in groups.items():
        if start is not None:
            sq[idx] += starts.seen[start][3]
    return np.sqrt(np.maximum(sq, 0.0))


def _add(sums: dict[str, np.ndarray], chunk: Chunk, coef: np.ndarray, parts: Parts, group: np.ndarray) -> None:
    """sums[g] += Σᵢ coefᵢ·(delta i's space parts) over the deltas i of each bucket g (``group``: (k,) buckets; one
    bucket, g = 0, for a plain mean): one float32 product per LoRA module and bucket in the chunk."""
    k = len(chunk)
    c = (coef * np.array([m.scale for m in chunk.metas])).astype(np.float32)
    runs = [(int(g), slice(None) if (group == g).all() else np.flatnonzero(group == g)) for g in np.unique(group)]
    for key, b_name, a_name in parts.products:
        b_all, a_all = chunk.values(b_name), chunk.values(a_name)  # (k, d_out, r), (k, r, d_in)
        for g, idx in runs:
            b, a, cg = b_all[idx], a_all[idx], c[idx]
            left = np.empty((b.shape[1], len(cg), b.shape[2]), np.float32)
            np.multiply(b.transpose(1, 0, 2), cg[None, :, None], out=left)  # scaled and laid out in one pass
            sums[key][g] += left.reshape(b.shape[1], -1) @ a.reshape(-1, a.shape[-1])  # [c₁s₁B₁ … cₖsₖBₖ] @ [A₁; …; Aₖ]
    for key, name, fill in parts.plain:
        v = chunk.values(name).reshape(k, -1).astype(np.float64) - fill
        for g, idx in runs:
            sums[key][g] += (coef[idx] @ v[idx]).reshape(sums[key].shape[1:])


def merge_chunks(read: Chunks, n: int, capped: list[float], latest: int, manifest: Manifest, options: RobustOptions,
                 starts: Starts, step: Step | None, rank: int, scale: float) -> tuple[Delta, dict[str, Any]]:
    """The version's tensors and report, as ``aggregate._merge_claimed`` makes them, from chunked deltas.

    ``capped[i]``: delta i's capped sample weight; its merge weight is that times its staleness factor. Clipping
    (``clip_norm``, or ``clip_median`` times the median update norm: one extra pass) scales each update by λ. With
    ``options.trim``, the deltas (read in ``buckets.shuffled`` order) are summed into ``options.buckets`` buckets and the
    version is the trimmed mean of the bucket means (``buckets.trimmed_across``); else the weighted mean.
    """
    parts = starts.parts
    bound = options.clip_norm
    norms = np.zeros(n)
    clipping = options.clip_norm is not None or options.clip_median is not None
    if options.clip_norm is None and clipping:  # the median bound needs every norm before the first λ: one more pass
        for chunk in read():
            norms[chunk.positions] = _norms(chunk, parts, starts, [starts.keys(m) for m in chunk.metas])
        if bound is None:
            median = float(np.median(norms)) if n else 0.0
            bound = options.clip_median * median if median > 0 else None  # type: ignore[operator]
    groups = buckets.count(n, options.buckets) if options.trim > 0 else 1
    # B bucket sums: float32 halves their memory, and the per-delta trimmed mean stacks float32 values too
    dtype = np.float64 if groups == 1 else np.float32
    sums = {key: np.zeros((groups, *shape), dtype) for key, shape in _space_shapes(manifest, parts).items()}
    coef_of: dict[tuple[int, tuple[int, int]], float] = {}  # (bucket, version) -> its coefficient in the bucket's sum
    totals = np.zeros(groups)
    samples, count, stale = 0, 0, []
    first: DeltaMeta | None = None
    for chunk in read():
        keys = [starts.keys(m) for m in chunk.metas]
        behind = [max(0, latest - (m.parent or 0)) for m in chunk.metas]
        w = np.array([capped[p] * staleness_factor(s) for p, s in zip(chunk.positions, behind)])
        if options.clip_norm is not None:
            norms[chunk.positions] = _norms(chunk, parts, starts, keys)
        nrm = norms[chunk.positions]
        lam = np.minimum(1.0, bound / np.where(nrm > bound, nrm, bound)) if bound is not None else np.ones(len(chunk))
        group = buckets.of(chunk.positions, n, groups)
        _add(sums, chunk, w * lam, parts, group)
        for (start, parent), wi, li, g in zip(keys, w, lam, group.tolist()):
            if parent is not None:  # parent + λ·(delta − start)
                coef_of[g, parent] = coef_of.get((g, parent), 0.0) + wi
                coef_of[g, start] = coef_of.get((g, start), 0.0) - wi * li
        np.add.at(totals, group, w)
        samples += sum(math.ceil(capped[p]) for p in chunk.positions)
        count += len(chunk)
        stale += [b for b in behind if b]
        first = first or chunk.metas[0]
    if count != n or first is None:
        raise HubError(f"aggregation: read {count} deltas, claimed {n}")
    total = float(totals.sum())
    if total <= 0:
        raise HubError("aggregation: weights sum to 0 (every delta has samples=0?)")
    for (g, key), c in coef_of.items():
        if c:
            for part, v in starts.seen[key][1].items():
                sums[part][g] += c * v
    if groups == 1:
        mean = {k: v[0] / total for k, v in sums.items()}
    else:
        mean = {k: buckets.trimmed_across(v, totals, options.trim) for k, v in sums.items()}
    shell = Delta({s.name: np.zeros(s.shape, np.float32) for s in manifest.slots}, first)
    tensors, errors = from_space_parts(shell, step(mean) if step else mean, rank, scale)
    out_rank = rank if parts.products else 0
    meta = merged_meta(first, out_rank, scale, samples, n)
    report: dict[str, Any] = {"total_weight": total, "passes": 2 if options.clip_norm is None and clipping else 1,
                              "max_refactor_error": max(errors.values(), default=0.0), "stale": len(stale),
                              "max_staleness": max(stale, default=0)}
    if options.trim > 0:
        report["trimmed"] = buckets.report(n, options.buckets, options.trim)
    if bound is not None:
        report.update(clip_bound=bound, clipped=int((norms > bound).sum()), max_update_norm=float(norms.max(initial=0.0)))
    return Delta(tensors, meta), report


def _space_shapes(manifest: Manifest, parts: Parts) -> dict[str, tuple[int, ...]]:
    shapes = {s.name: s.shape for s in manifest.slots}
    out = {key: (shapes[b][0], shapes[a][1]) for key, b, a in parts.products}
    out.update({key: shapes[name] for key, name, _ in parts.plain})
    return out
