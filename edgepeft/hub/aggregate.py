"""Fleet aggregation: claim the pending deltas, merge them streaming from the store, publish a version.

The weighted mean (weights: each delta's ``meta.samples``, capped by ``limits.sample_weights``) or the trimmed mean
(over the deltas, or over bucket means in rounds of more than ``RobustOptions.buckets``) is taken in chunks of deltas
(``stream_merge``: one matrix product per LoRA module, bucket and chunk) or, for methods that need it (DoRA, VeRA, ...),
one delta at a time (``edgepeft.delta.merge``, ``trimmed_merge``); either way in each method's own space: ΔW for LoRA, plain weighted
mean for bias and head slots, output re-factored at the bundle's LoRA rank and scale so devices keep training from it.
Claiming is one transaction, so every accepted delta lands in exactly one version; a version whose builder died stays
``building`` and ``recover`` rebuilds it from the same deltas and options.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from edgepeft import methods
from edgepeft.delta.format import Delta, DeltaMeta, delta_bytes, delta_from_bytes, file_meta, replace_meta
from edgepeft.delta.merge import merge, space_parts
from edgepeft.delta.transport import is_packed, pack, packed_meta, unpack
from edgepeft.errors import DeltaError, HubError
from edgepeft.frozen import BaseWeights, base_weights, frozen_arrays
from edgepeft.hub import buckets, delta_chunks, mixed_ranks, stream_merge, trimmed_merge
from edgepeft.hub.server_step import is_plain, server_step
from edgepeft.hub.limits import MAX_PUBLISHED_SAMPLES, readable, sample_weights, staleness_factor
from edgepeft.hub.robust import RobustOptions, clip_update, update_norm
from edgepeft.hub.store import BUILDING, BundleRec, DeltaRec, Due, Fleet, Store, VersionRec
from edgepeft.hub.trimmed_merge import Pairs, Step
from edgepeft.manifest import Manifest
from edgepeft.names import WEIGHTS_INDEX_FILE

# A merge multiplies small factors (d x r @ r x d) and takes d x d SVDs: a BLAS thread pool spinning against the
# hub's request handling made 1,000 MiniLM-size deltas 16x slower than one thread (benchmarks/results/hub.json,
# "blas"). None: the BLAS library's default.
MERGE_BLAS_THREADS: int | None = 1
# Threads of a merge: the LoRA modules of each chunk of deltas are dequantized and multiplied on this many threads at
# once, each on one BLAS thread (numpy and BLAS release the GIL), while another thread reads and decompresses the next
# chunk. None: every core this process may run on, so a merge competes with serving uploads for them while it runs.
MERGE_THREADS: int | None = None


def merge_threads() -> int:
    """The threads a merge uses (``MERGE_THREADS``, default every core this process may run on)."""
    if MERGE_THREADS:
        return MERGE_THREADS
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_delta(data: bytes, where: str, manifest: Manifest) -> Delta:
    """A delta from raw safetensors or packed bytes, fully checked against the bundle manifest.

    Shapes must be the bundle's (LoRA at most at its rank): the manifest then bounds the payload size,
    which is checked before anything is decompressed.
    """
    if is_packed(data):
        return unpack(data, where, manifest=manifest, for_training=True)
    return delta_from_bytes(data, where, manifest, for_training=True)


def peek_meta(data: bytes, manifest: Manifest) -> DeltaMeta | None:
    """The meta of an upload from its header alone (None when even that cannot be read)."""
    try:
        return packed_meta(data, "upload", manifest) if is_packed(data) else file_meta(data, "upload", manifest)
    except DeltaError:
        return None


def disagreement(meta: DeltaMeta | None, manifest: Manifest, ranks: tuple[int, ...] = ()) -> str | None:
    """Why a delta's method or method config is not the fleet bundle's (None: it agrees, or says nothing).
    ``ranks``: the LoRA ranks the fleet takes (empty: the bundle's own)."""
    if meta is None:
        return None
    config = json.dumps(manifest.method_config, sort_keys=True) if manifest.method_config else "its defaults"
    if meta.method and set(meta.method.split("+")) != set(manifest.method.split("+")):
        return (f"delta was trained with method {meta.method!r}, but this fleet's bundle trains {manifest.method!r} "
                f"(config {config}); train it on the fleet's bundle")
    rank, scale = bundle_lora(manifest)
    if rank and meta.method and not math.isclose(meta.scale, scale, rel_tol=1e-6):
        return (f"delta has rank {meta.rank}, alpha {meta.alpha:g}, but this fleet's bundle trains {manifest.method} at rank "
                f"{rank}, alpha {rank * scale:g} (config {config}); train it on the fleet's bundle")
    return mixed_ranks.refusal(meta, ranks, manifest) if rank and meta.method else None


def bundle_lora(manifest: Manifest) -> tuple[int, float]:
    """(rank, scale) of the bundle's LoRA slots: the shape every published version has."""
    found = {(s.rank, s.scale) for s in manifest.slots if s.rank}
    if len(found) > 1:
        raise HubError(f"bundle LoRA slots disagree on (rank, scale): {sorted(found)}")
    return found.pop() if found else (0, 1.0)


class _Parents:
    """Published versions by number, parsed, a few kept (deltas span at most the staleness window)."""

    def __init__(self, store: Store, fleet: str, adapter: str, manifest: Manifest, keep: int = 12) -> None:
        self.store, self.fleet, self.adapter, self.manifest, self.keep = store, fleet, adapter, manifest, keep
        self.cache: OrderedDict[int | tuple[int, int], Delta | None] = OrderedDict()

    def get(self, version: int | None) -> Delta | None:
        if not version:
            return None
        if version not in self.cache:
            rec = self.store.get_version(self.fleet, self.adapter, version)
            self.cache[version] = None if rec is None or rec.sha256 is None else \
                parse_delta(self.store.get_blob(rec.sha256), f"{self.adapter} v{version}", self.manifest)
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        return self.cache[version]

    def at_rank(self, version: int, rank: int) -> Delta | None:
        """The version as a device of ``rank`` pulled it (its packed rank form), cached like the full versions."""
        key = (version, rank)
        if key not in self.cache:
            rec = self.store.get_version(self.fleet, self.adapter, version)
            form = None if rec is None else (rec.report.get("ranks") or {}).get(str(rank))
            self.cache[key] = None if form is None else \
                parse_delta(self.store.get_blob(form["sha256"]), f"{self.adapter} v{version} at rank {rank}", self.manifest)
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        return self.cache[key]


def stored_base_weights(store: Store, bundle: BundleRec) -> BaseWeights | None:
    """The bundle's frozen weights read from the hub's blobs, when one of its methods aggregates against them (DoRA)."""
    manifest = bundle.manifest
    if not any(methods.owner(s.kind).needs_base for s in manifest.slots):
        return None
    files = {f.name: f.sha256 for f in bundle.files}
    if WEIGHTS_INDEX_FILE not in files or manifest.weights not in files:
        raise HubError(f"bundle {bundle.fingerprint[:16]}: {WEIGHTS_INDEX_FILE} or {manifest.weights} is not stored; "
                       "its method aggregates against the base weights")
    index = json.loads(store.get_blob(files[WEIGHTS_INDEX_FILE]))
    return base_weights(frozen_arrays(index, np.frombuffer(store.get_blob(files[manifest.weights]), np.uint8)), manifest)


def _server_step(options: RobustOptions, parent: Delta | None, grandparent: Delta | None, base: BaseWeights | None) -> Step | None:
    """The mean's space parts -> the version's (``options.server_lr``, ``server_momentum``); None: the mean itself."""
    if is_plain(options.server_lr, options.server_momentum):
        return None
    x1 = None if parent is None else space_parts(parent, base)
    x2 = None if grandparent is None else space_parts(grandparent, base)
    return lambda mean: server_step(mean, x1, x2, options.server_lr, options.server_momentum)


def combine(pairs: Pairs, n: int, manifest: Manifest, options: RobustOptions, base: BaseWeights | None = None, *,
            parent: Delta | None = None, grandparent: Delta | None = None) -> tuple[Delta, dict[str, Any]]:
    """Merge one pass of (delta, weight) pairs (clipping already applied; for a trimmed mean of more than
    ``options.buckets`` deltas, in the bucketing order) at the bundle's rank and scale, then take the server step
    (``options.server_lr``, ``server_momentum``) from ``parent``, the latest version, and its own parent."""
    rank, scale = bundle_lora(manifest)
    step = _server_step(options, parent, grandparent, base)
    if options.trim > 0 and n > options.buckets:
        return trimmed_merge.bucketed_merge(pairs, n, options.trim, options.buckets, rank, scale, base, step)
    if options.trim > 0:
        return trimmed_merge.trimmed_merge(pairs, n, options.trim, rank, scale, options.memory_mb, base, step)
    merged, rep = merge(pairs(), rank=rank if rank else None, scale=scale, base=base, step=step)
    return merged, {"total_weight": rep.total_weight, "passes": 1, "max_refactor_error": max(rep.errors.values(), default=0.0)}


def _merge_claimed(store: Store, claimed: list[DeltaRec], latest: int, manifest: Manifest, options: RobustOptions,
                   parents: "_Parents", base: BaseWeights | None, before: int = 0) -> tuple[Delta, dict[str, Any]]:
    """Merge the claimed deltas (see :func:`_merge_per_delta`): in chunks, one matrix product per LoRA module and
    chunk (``stream_merge``), where the bundle's methods allow it; else one delta at a time."""
    if stream_merge.eligible(manifest):
        return _merge_chunked(store, claimed, latest, manifest, options, parents, before)
    return _merge_per_delta(store, claimed, latest, manifest, options, parents, base, before)


def _merge_order(claimed: list[DeltaRec], latest: int, options: RobustOptions) -> list[DeltaRec]:
    """The claimed deltas in the order they are merged: for a trimmed mean, the bucketing order (``buckets.shuffled``:
    the same for the same deltas after the same version, whatever order they were claimed in); else as claimed."""
    return [claimed[p] for p in buckets.shuffled([d.id for d in claimed], latest)] if options.trim > 0 else claimed


def _merge_chunked(store: Store, claimed: list[DeltaRec], latest: int, manifest: Manifest, options: RobustOptions,
                   parents: "_Parents", before: int = 0) -> tuple[Delta, dict[str, Any]]:
    """:func:`_merge_per_delta`'s version and report, from deltas read in chunks (``stream_merge.merge_chunks``);
    with a trimmed mean, read in the bucketing order."""
    claimed = _merge_order(claimed, latest, options)
    ids = [d.id for d in claimed]
    capped = sample_weights([d.samples for d in claimed], options.max_samples, [d.device for d in claimed])  # in ids order
    rank, scale = bundle_lora(manifest)
    starts = stream_merge.Starts(stream_merge.Parts(manifest), rank, parents.get, parents.at_rank)
    step = _server_step(options, parents.get(latest), parents.get(before), None)

    def read(positions: Sequence[int] | None) -> Iterator[delta_chunks.Chunk]:
        """The claimed deltas in chunks, all of them or those at ``positions``."""
        if positions is None:
            return delta_chunks.chunks(store.iter_delta_bytes(ids), manifest)
        return delta_chunks.chunks(store.iter_delta_bytes([ids[p] for p in positions]), manifest, positions=positions)

    merged, stats = stream_merge.merge_chunks(read, len(ids), capped, latest, manifest, options, starts, step, rank, scale,
                                              merge_threads())
    return merged, {"count": len(ids), "samples": merged.meta.samples, **stats, "options": options.to_dict()}


def _merge_per_delta(store: Store, claimed: list[DeltaRec], latest: int, manifest: Manifest, options: RobustOptions,
                     parents: "_Parents", base: BaseWeights | None, before: int = 0) -> tuple[Delta, dict[str, Any]]:
    """Merge the claimed deltas: capped sample weights, each times its staleness factor, updates clipped.

    Staleness of a delta = ``latest`` (the newest version published before this one) - its parent version;
    its merge weight is its capped samples times ``limits.staleness_factor`` (FedBuff's 1/sqrt(1 + s)).
    Clipping: to ``clip_norm``, else to ``clip_median`` times the median update norm of these deltas (one
    extra pass over them, reading one at a time). The server step moves from ``latest`` (with momentum from ``before``,
    the version ``latest`` was made after; 0: none). A trimmed mean reads them in the bucketing order.
    """
    claimed = _merge_order(claimed, latest, options)
    ids = [d.id for d in claimed]
    capped = sample_weights([d.samples for d in claimed], options.max_samples, [d.device for d in claimed])  # in ids order
    full, _ = bundle_lora(manifest)

    def read() -> Iterator[tuple[float, Delta]]:
        for w, (delta_id, data) in zip(capped, store.iter_delta_bytes(ids)):
            d = parse_delta(data, f"delta {delta_id[:16]}", manifest)
            # a lower-rank device trained from the version's rank-r form: count its update on the full version
            yield w, mixed_ranks.measured_from_start(d, full, parents.at_rank, parents.get(d.meta.parent))

    bound = options.clip_norm
    if bound is None and options.clip_median is not None:
        median = float(np.median([update_norm(d, parents.get(d.meta.parent), base) for _, d in read()]))
        bound = options.clip_median * median if median > 0 else None
    norms: list[float] = []
    stale: list[int] = []

    def pairs() -> Iterator[tuple[Delta, float]]:
        norms.clear()
        stale.clear()
        for w, d in read():
            behind = max(0, latest - (d.meta.parent or 0))
            if behind:
                stale.append(behind)
            parent = parents.get(d.meta.parent)
            d = replace_meta(d, samples=math.ceil(w))  # the version's samples count capped weights too
            if bound is not None:
                d, norm = clip_update(d, parent, bound, base)
                norms.append(norm)
            yield d, w * staleness_factor(behind)

    merged, stats = combine(pairs, len(ids), manifest, options, base, parent=parents.get(latest), grandparent=parents.get(before))
    report = {"count": len(ids), "samples": merged.meta.samples, **stats, "options": options.to_dict(),
              "stale": len(stale), "max_staleness": max(stale, default=0)}
    if norms:
        report.update(clip_bound=bound, clipped=sum(1 for x in norms if x > bound), max_update_norm=max(norms))
    return merged, report


def build_version(store: Store, fleet: Fleet, adapter: str, version: int) -> VersionRec:
    """Merge the deltas claimed for a ``building`` version and publish it."""
    rec = store.get_version(fleet.name, adapter, version)
    if rec is None or rec.state != BUILDING:
        raise HubError(f"{fleet.name}/{adapter} v{version} is not being built")
    bundle = store.get_bundle(fleet.bundle)
    if bundle is None:
        raise HubError(f"fleet {fleet.name!r}: bundle {fleet.bundle[:16]} is missing")
    manifest = bundle.manifest
    previous = [v.version for v in store.list_versions(fleet.name, adapter) if v.version < version]
    parent = previous[-1] if previous else None
    started = time.perf_counter()
    if "publish" in rec.options:  # an admin upload: its bytes were stored before the claim
        data = store.get_blob(rec.options["publish"])
        d = parse_delta(data, f"{adapter} v{version}", manifest)
        out = replace_meta(d, adapter=adapter, version=version, parent=parent, creator=d.meta.creator or "hub")
        report: dict[str, Any] = {"count": 0, "published": True}
    else:
        options = RobustOptions.from_dict(rec.options)
        claimed = store.list_deltas(fleet.name, adapter, version=version)
        if not claimed:
            raise HubError(f"{fleet.name}/{adapter} v{version}: no deltas were claimed for it")
        parents = _Parents(store, fleet.name, adapter, manifest)
        with threadpool_limits(MERGE_BLAS_THREADS, user_api="blas"):
            merged, report = _merge_claimed(store, claimed, parent or 0, manifest, options, parents,
                                           stored_base_weights(store, bundle), previous[-2] if len(previous) > 1 else 0)
        out = replace_meta(merged, adapter=adapter, version=version, parent=parent, creator="hub")
    report["seconds"] = round(time.perf_counter() - started, 4)
    out = replace_meta(out, samples=min(out.meta.samples, MAX_PUBLISHED_SAMPLES))
    report["ranks"] = mixed_ranks.rank_forms(out, fleet.ranks, store.put_blob)  # what devices of each lower rank pull
    data = delta_bytes(out)  # the exact float32 version: the parent the hub clips against, and form=raw
    readable(data, manifest, f"{fleet.name}/{adapter} v{version}")
    wire = pack(out)  # what devices pull by default (int8 + zstd); its sha256 is the one pulls check
    readable(wire, manifest, f"{fleet.name}/{adapter} v{version} (packed)")
    report["packed"] = {"sha256": store.put_blob(wire), "size": len(wire)}
    store.finish_version(fleet.name, adapter, version, data, parent=parent, report=report)
    got = store.get_version(fleet.name, adapter, version)
    if got is None:
        raise HubError(f"{fleet.name}/{adapter} v{version} vanished while it was built")
    return got


def aggregate(store: Store, fleet: str, adapter: str = "default", options: dict[str, Any] | None = None, *,
              if_due: bool = False) -> VersionRec | None:
    """Aggregate pending deltas of an adapter into a new version; None when nothing is pending (or, ``if_due``,
    when the fleet's policy does not hold as the claim sees the pending deltas).

    A fleet with ``aggregate_every = K`` makes each version from the first K pending deltas by arrival (FedBuff's
    buffer; later ones wait for the next version and count by their staleness); otherwise every pending delta.
    """
    f = store.get_fleet(fleet)
    if f is None:
        raise HubError(f"no fleet {fleet!r}")
    opts = RobustOptions.from_dict(f.robust if options is None else options)
    claim = store.claim_version(fleet, adapter, opts.to_dict(), limit=f.aggregate_every or None,
                                due=policy(f) if if_due else None)
    if claim is None:
        return None
    return build_version(store, f, adapter, claim[0])


def publish(store: Store, fleet: str, adapter: str, data: bytes) -> VersionRec:
    """Publish uploaded delta bytes (checked against the fleet's bundle) as the next version, merging nothing."""
    f = store.get_fleet(fleet)
    if f is None:
        raise HubError(f"no fleet {fleet!r}")
    bundle = store.get_bundle(f.bundle)
    if bundle is None:
        raise HubError(f"fleet {fleet!r}: bundle {f.bundle[:16]} is missing")
    parse_delta(data, "published delta", bundle.manifest)
    sha = store.put_blob(data)
    claim = store.claim_version(fleet, adapter, {"publish": sha}, take_pending=False)
    if claim is None:
        raise HubError(f"{fleet}/{adapter}: could not reserve a version")
    return build_version(store, f, adapter, claim[0])


def recover(store: Store) -> list[VersionRec]:
    """Finish every version left ``building`` by a builder that died (same deltas, same options)."""
    done = []
    for f in store.list_fleets():
        for v in store.list_versions(f.name, state=BUILDING):
            try:
                done.append(build_version(store, f, v.adapter, v.version))
            except HubError:
                continue  # another process finished it meanwhile
    return done


def policy(fleet: Fleet, now: float | None = None) -> Due | None:
    """The fleet's aggregation policy at ``now``: every N pending deltas, or the oldest pending T minutes old; None: manual."""
    if not fleet.aggregate_every and not fleet.aggregate_minutes:
        return None
    now = time.time() if now is None else now
    return Due(fleet.aggregate_every, now - fleet.aggregate_minutes * 60 if fleet.aggregate_minutes else None)


def due(store: Store, fleet: Fleet, adapter: str, now: float | None = None) -> bool:
    """True when the fleet's policy says aggregate."""
    rule = policy(fleet, now)
    if rule is None:
        return False
    pending = store.list_deltas(fleet.name, adapter, pending=True)
    return bool(pending) and rule.holds(len(pending), pending[0].received)


def maybe_aggregate(store: Store, fleet: str, adapter: str = "default") -> VersionRec | None:
    """Aggregate while the fleet's policy says so (a buffer of K per version); the last version made, or None.

    The claim checks the policy again in its own transaction: with several hub processes on one store, another may
    have claimed the deltas that made this one see a version due."""
    f = store.get_fleet(fleet)
    made = None
    while f is not None and due(store, f, adapter):
        version = aggregate(store, fleet, adapter, if_due=True)
        if version is None:
            break
        made = version
    return made


def check_parent(latest: int, parent: int | None, staleness: int) -> str | None:
    """Why a delta trained from ``parent`` is refused when ``latest`` is published, or None if it is fresh."""
    p = parent or 0
    if p > latest:
        return f"parent version {p} does not exist (latest is {latest}); pull the latest version"
    if latest - p > staleness:
        return f"stale: trained from version {p}, latest is {latest}, the fleet accepts {staleness} behind; pull and retrain"
    return None

