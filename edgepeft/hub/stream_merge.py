"""The hub's weighted mean in ΔW space over thousands of deltas: one matrix product per LoRA module and chunk.

Σᵢ γᵢ·Bᵢ@Aᵢ over a chunk of k deltas (γᵢ = weight·LoRA scale) is [B₁ … Bₖ] @ [γ₁A₁; …; γₖAₖ], one (d x kr) @ (kr x d)
product: the same flops as k small ones, at the BLAS library's large-matrix speed. Each factor is dequantized once,
straight into that layout (B's codes times its row scales, written as Bᵀ stacked; A's codes times its row scales times
γᵢ), and a chunk's LoRA modules run on the merge's threads (``aggregate.MERGE_THREADS``), one BLAS thread each, while
``delta_chunks`` reads and decompresses the next chunk. Bias and head slots are a (k,) @ (k, n) product.
Clipping and mixed ranks need no ΔW per delta either. A delta trained from ``start`` (its parent version, or that
version refitted to the device's rank) on top of ``parent`` counts as ``parent + λ·(delta - start)``
(``mixed_ranks.measured_from_start``, ``robust.clip_update``): the versions' parts are summed once per version with
their total coefficient, and the update's norm comes from r x r Gram matrices,
‖s·B@A − W‖² = s²·Σ(BᵀB ∘ AAᵀ) − 2s·s_w·Σ(BᵀB_w ∘ A A_wᵀ) + ‖W‖²  (W = s_w·B_w@A_w).
Clipping to the median norm takes one pass too (``merge_chunks``: two sums per bucket, a few deltas read again).
The trimmed mean sums the deltas into B bucket sums instead of one (``hub/buckets.py``) and trims across them. Exact:
the differential test (tests/test_stream_merge.py) holds it to the per-delta merge, and the trimmed mean with B >= n to
the per-delta trimmed mean. Methods whose space is not a product or a plain slot (DoRA, VeRA, ...) keep
``aggregate``'s per-delta path.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

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

Chunks = Callable[[Sequence[int] | None], Iterator[Chunk]]  # a fresh pass over the claimed deltas (None) or those at
#   these positions, in chunks
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


class _Inline:
    """A pool of one: runs the work in the calling thread."""

    def map(self, fn: Callable, items: Sequence) -> Iterator:
        return map(fn, items)

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _pool(threads: int) -> Any:
    """``threads`` threads for the per-module work of a chunk (numpy and BLAS release the GIL); 1: the caller's own."""
    return ThreadPoolExecutor(threads, thread_name_prefix="merge") if threads > 1 else _Inline()


@dataclass
class _Decoded:
    """One LoRA module of a chunk: each delta's B dequantized once, laid out for the products, and (when clipping)
    its A and its share of each delta's squared update norm."""

    left: np.ndarray  # (k, r, d_out) float32: each delta's Bᵀ, so (k·r, d_out) is [B₁ … Bₖ]ᵀ, one matrix
    a: np.ndarray | None = None  # (k, r, d_in) float32 dequantized A (kept when the norms needed it)
    sq: np.ndarray | None = None  # (k,) this module's share of ‖delta − start‖²


def _decode(chunk: Chunk, product: tuple[str, str, str], starts: Starts, groups: dict, norms: bool) -> _Decoded:
    """Dequantize a module's B into the product layout; with ``norms``, its share of each update's squared norm from
    float64 r x r Gram matrices, ‖s·B@A − W‖² = s²·Σ(BᵀB ∘ AAᵀ) − 2s·s_w·Σ(BᵀB_w ∘ A A_wᵀ) (+ ‖W‖², added once)."""
    key, b_name, a_name = product
    q, s = chunk.factor(b_name)  # (k, d_out, r), (k, d_out)
    left = np.empty((q.shape[0], q.shape[2], q.shape[1]), np.float32)
    with np.errstate(over="ignore"):  # as dequantize (a non-finite value was refused by ``factor``)
        np.multiply(q.transpose(0, 2, 1), s[:, None, :], out=left)  # written in order: the inner loop runs over d_out
    if not norms:
        return _Decoded(left)
    a32 = chunk.values(a_name)  # (k, r, d_in)
    if chunk.layout is None:  # a raw chunk's own array: ``_products`` scales this one in place
        a32 = a32.copy()
    scale = np.array([m.scale for m in chunk.metas])
    bt = left.astype(np.float64)  # (k, r, d_out): Bᵀ
    a = a32.astype(np.float64)
    sq = scale**2 * np.einsum("kij,kij->k", bt @ bt.transpose(0, 2, 1), a @ a.transpose(0, 2, 1))
    for start, idx in groups.items():
        if start is None:
            continue
        sb, sa = starts.seen[start][2][key]  # s_w·B_w, A_w
        x = np.matmul(sb.T, bt[idx].transpose(0, 2, 1))  # (k, r_w, r): (s_w·B_w)ᵀ B
        y = np.matmul(a[idx], sa.T)  # (k, r, r_w): A A_wᵀ
        sq[idx] -= 2 * scale[idx] * np.einsum("ksr,krs->k", x, y)
    return _Decoded(left, a32, sq)


def _norms(chunk: Chunk, parts: Parts, starts: Starts, groups: dict, decoded: list[_Decoded]) -> np.ndarray:
    """‖delta − start‖ of each delta of the chunk over every part of the aggregation space: the modules' shares
    (``_decode``), the plain slots', and each start's ‖W‖² once."""
    sq = np.sum([d.sq for d in decoded], axis=0) if decoded else np.zeros(len(chunk))
    for key, name, fill in parts.plain:
        v = chunk.values(name).reshape(len(chunk), -1).astype(np.float64) - fill
        for start, idx in groups.items():
            if start is not None:
                v[idx] -= starts.seen[start][1][key].reshape(-1)
        sq += np.einsum("kn,kn->k", v, v)
    for start, idx in groups.items():
        if start is not None:
            sq[idx] += starts.seen[start][3]
    return np.sqrt(np.maximum(sq, 0.0))


def _runs(group: np.ndarray) -> tuple[np.ndarray | None, list[tuple[int, int, int]]]:
    """(order that makes each group's deltas consecutive, or None when they are; [(group, lo, hi)] in that order)."""
    order = None if (np.diff(group) >= 0).all() else np.argsort(group, kind="stable")
    g = group if order is None else group[order]
    cuts = [0, *(np.flatnonzero(np.diff(g)) + 1).tolist(), len(g)]
    return order, [(int(g[lo]), lo, hi) for lo, hi in zip(cuts, cuts[1:])]


def _products(sums: np.ndarray, chunk: Chunk, a_name: str, dec: _Decoded, gamma: np.ndarray, order: np.ndarray | None,
              runs: list[tuple[int, int, int]]) -> None:
    """sums[g] += Σᵢ γᵢ·Bᵢ@Aᵢ over each run's deltas: one (d_out x m·r) @ (m·r x d_in) float32 product per run, γᵢ
    (weight times LoRA scale) applied to A with its row scales, in the pass that dequantizes it."""
    left = dec.left if order is None else dec.left[order]
    if dec.a is not None:  # dequantized already (for the norms)
        a = dec.a if order is None else dec.a[order]  # either way an array of this call's own: scaled in place
        right = np.multiply(a, gamma.astype(np.float32)[:, None, None], out=a)
    else:
        q, s = chunk.factor(a_name)  # (k, r, d_in), (k, r)
        if order is not None:
            q, s = q[order], s[order]
        col = (s * gamma[:, None]).astype(np.float32)
        right = np.empty(q.shape, np.float32)
        with np.errstate(over="ignore"):
            np.multiply(q, col[:, :, None], out=right)
    r = right.shape[1]
    lhs, rhs = left.reshape(-1, left.shape[2]), right.reshape(-1, right.shape[2])
    for g, lo, hi in runs:
        sums[g] += lhs[lo * r:hi * r].T @ rhs[lo * r:hi * r]  # [B₁ … Bₘ] @ [γ₁A₁; …; γₘAₘ] (BLAS takes the transpose)


def _add(pool: Any, sums: dict[str, np.ndarray], chunk: Chunk, coef: np.ndarray, parts: Parts, group: np.ndarray,
         decoded: list[_Decoded] | None = None) -> None:
    """sums[g] += Σᵢ coefᵢ·(delta i's space parts) over the deltas i of each group g (``group``: (k,) groups; one,
    g = 0, for a plain mean): one float32 product per LoRA module and group in the chunk, the modules on ``pool``."""
    gamma = coef * np.array([m.scale for m in chunk.metas])
    order, runs = _runs(group)
    gamma_in_order = gamma if order is None else gamma[order]

    def module(i: int) -> None:
        key, b_name, a_name = parts.products[i]
        dec = decoded[i] if decoded is not None else _decode(chunk, parts.products[i], None, {}, False)  # type: ignore[arg-type]
        _products(sums[key], chunk, a_name, dec, gamma_in_order, order, runs)

    list(pool.map(module, range(len(parts.products))))
    k = len(chunk)
    for key, name, fill in parts.plain:
        v = chunk.values(name).reshape(k, -1).astype(np.float64) - fill
        for g in np.unique(group).tolist():
            idx = group == g
            sums[key][g] += (coef[idx] @ v[idx]).reshape(sums[key].shape[1:])


def merge_chunks(read: Chunks, n: int, capped: list[float], latest: int, manifest: Manifest, options: RobustOptions,
                 starts: Starts, step: Step | None, rank: int, scale: float, threads: int = 1) -> tuple[Delta, dict[str, Any]]:
    """The version's tensors and report, as ``aggregate._merge_claimed`` makes them, from chunked deltas, the LoRA
    modules of a chunk on ``threads`` threads.

    ``capped[i]``: delta i's capped sample weight; its merge weight is that times its staleness factor. Clipping
    (``clip_norm``, or ``clip_median`` times the median update norm) scales each update by λ. With ``options.trim``,
    the deltas (read in ``buckets.shuffled`` order) are summed into ``options.buckets`` buckets and the version is the
    trimmed mean of the bucket means (``buckets.trimmed_across``); else the weighted mean.

    The median bound is known only once every norm is: one pass still does, with two sums per bucket. Deltas whose
    norm is at most a threshold t (the median bound of the norms read so far, the chunk's own included) add w·X to
    the first, the others (w/‖X‖)·X to the second; at the end the version's sum is first + bound·second, exact for
    every delta on the side of the bound its t put it on. Those between their t and the bound are read again and
    corrected by the difference (``report["reread"]``).
    """
    parts = starts.parts
    groups = buckets.count(n, options.buckets) if options.trim > 0 else 1
    clipping = options.clip_norm is not None or options.clip_median is not None
    split = clipping and options.clip_norm is None  # the median bound: two sums per bucket, below and above t
    sides = 2 if split else 1
    # bucket sums: float32 halves their memory, and the per-delta trimmed mean stacks float32 values too
    dtype = np.float64 if groups == 1 else np.float32
    sums = {key: np.zeros((groups * sides, *shape), dtype) for key, shape in _space_shapes(manifest, parts).items()}
    norms, weight, above = np.zeros(n), np.zeros(n), np.zeros(n, bool)
    keys_at: list[tuple | None] = [None] * n
    threshold = options.clip_norm
    seen: list[np.ndarray] = []  # the norms read so far (split: each chunk's threshold is their median bound)
    samples, count, stale = 0, 0, []
    first: DeltaMeta | None = None
    with _pool(threads) as pool:
        for chunk in read(None):
            keys = [starts.keys(m) for m in chunk.metas]
            pos = chunk.positions
            behind = [max(0, latest - (m.parent or 0)) for m in chunk.metas]
            w = np.array([capped[p] * staleness_factor(s) for p, s in zip(pos, behind)])
            starts_of = {key: np.array([i for i, (s, _) in enumerate(keys) if s == key]) for key in {s for s, _ in keys}}
            decoded = list(pool.map(lambda p: _decode(chunk, p, starts, starts_of, clipping), parts.products))
            coef, side = w, np.zeros(len(chunk), np.int64)
            if clipping:
                nrm = _norms(chunk, parts, starts, starts_of, decoded)
                norms[pos] = nrm
                if split:  # the median bound of the norms so far: most deltas land on their final side
                    seen.append(nrm)
                    threshold = options.clip_median * float(np.median(np.concatenate(seen)))  # type: ignore[operator]
                    up = nrm > threshold
                    coef, side = np.where(up, w / np.where(up, nrm, 1.0), w), up.astype(np.int64)
                    above[pos] = up
                else:
                    coef = w * np.minimum(1.0, threshold / np.where(nrm > threshold, nrm, threshold))
            _add(pool, sums, chunk, coef, parts, buckets.of(pos, n, groups) * sides + side, decoded)
            del decoded
            weight[pos] = w
            for p, k in zip(pos.tolist(), keys):
                keys_at[p] = k
            samples += sum(math.ceil(capped[p]) for p in pos)
            count += len(chunk)
            stale += [b for b in behind if b]
            first = first or chunk.metas[0]
        if count != n or first is None:
            raise HubError(f"aggregation: read {count} deltas, claimed {n}")
        bound = options.clip_norm
        if split:
            median = float(np.median(norms)) if n else 0.0
            bound = options.clip_median * median if median > 0 else None  # type: ignore[operator]
        lam = np.minimum(1.0, bound / np.where(norms > bound, norms, bound)) if bound is not None else np.ones(n)
        reread = _settle(pool, read, sums, parts, n, groups, weight, norms, above, lam, bound) if split else 0
        total = float(weight.sum())
        if total <= 0:
            raise HubError("aggregation: weights sum to 0 (every delta has samples=0?)")
        coef_of: dict[tuple[int, tuple[int, int]], float] = {}  # (bucket, version) -> its coefficient in the bucket's sum
        bucket = buckets.of(np.arange(n), n, groups).tolist()
        for p, (start, parent) in enumerate(keys_at):  # type: ignore[misc]
            if parent is not None:  # parent + λ·(delta − start)
                coef_of[bucket[p], parent] = coef_of.get((bucket[p], parent), 0.0) + weight[p]
                coef_of[bucket[p], start] = coef_of.get((bucket[p], start), 0.0) - weight[p] * lam[p]
        for (g, key), c in coef_of.items():
            if c:
                for part, v in starts.seen[key][1].items():
                    sums[part][g] += c * v
        totals = np.zeros(groups)
        np.add.at(totals, bucket, weight)
        if groups == 1:
            mean = {k: v[0] / total for k, v in sums.items()}
        else:
            mean = {k: buckets.trimmed_across(v, totals, options.trim, pool.map) for k, v in sums.items()}
        shell = Delta({s.name: np.zeros(s.shape, np.float32) for s in manifest.slots}, first)
        tensors, errors = from_space_parts(shell, step(mean) if step else mean, rank, scale, pool_map=pool.map)
    out_rank = rank if parts.products else 0
    meta = merged_meta(first, out_rank, scale, samples, n)
    report: dict[str, Any] = {"total_weight": total, "passes": 2 if reread else 1, "reread": reread,
                              "max_refactor_error": max(errors.values(), default=0.0), "stale": len(stale),
                              "max_staleness": max(stale, default=0)}
    if options.trim > 0:
        report["trimmed"] = buckets.report(n, options.buckets, options.trim)
    if bound is not None:
        report.update(clip_bound=bound, clipped=int((norms > bound).sum()), max_update_norm=float(norms.max(initial=0.0)))
    return Delta(tensors, meta), report


def _settle(pool: Any, read: Chunks, sums: dict[str, np.ndarray], parts: Parts, n: int, groups: int, weight: np.ndarray,
            norms: np.ndarray, above: np.ndarray, lam: np.ndarray, bound: float | None) -> int:
    """Fold each bucket's two sums into one, sums[g] = below + bound·above (``merge_chunks``), then correct the deltas
    the threshold put on the wrong side of the bound, read again: their weight times (λ − what they were given).
    Returns how many were read again."""
    b = bound or 0.0  # no bound (median 0): nothing is clipped, every delta above t is corrected to its full weight
    for key in list(sums):  # one module at a time: the two sums of every bucket become one, in memory of its own
        v = sums.pop(key)
        v[0::2] += v[1::2] * v.dtype.type(b)
        sums[key] = np.ascontiguousarray(v[0::2])
        del v
    given = np.where(above, b * weight / np.where(above, norms, 1.0), weight)
    wrong = np.flatnonzero(above != (norms > bound) if bound is not None else above)
    for chunk in read(wrong.tolist()) if len(wrong) else ():
        pos = chunk.positions
        fix = weight[pos] * lam[pos] - given[pos]
        decoded = list(pool.map(lambda p: _decode(chunk, p, None, {}, False), parts.products))  # type: ignore[arg-type]
        _add(pool, sums, chunk, fix, parts, buckets.of(pos, n, groups), decoded)
    return len(wrong)


def _space_shapes(manifest: Manifest, parts: Parts) -> dict[str, tuple[int, ...]]:
    shapes = {s.name: s.shape for s in manifest.slots}
    out = {key: (shapes[b][0], shapes[a][1]) for key, b, a in parts.products}
    out.update({key: shapes[name] for key, name, _ in parts.plain})
    return out
