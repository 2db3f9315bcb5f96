"""Mixed LoRA ranks in one fleet: which ranks a fleet takes, each delta measured from what its device started at,
and every published version refitted to each rank devices pull.

Devices that chose rank r < R (the bundle's rank) pull a version refitted to r (truncated SVD of ΔW) and train
from it. Their delta is then rebased onto the full version, ``delta - start + version`` (``delta.ranks.rebase``),
so the merge averages what each device learned, not the truncation it started from; the merge itself is the
usual one in ΔW space, re-factored at R.
"""

from __future__ import annotations

from typing import Callable, Iterable

from edgepeft import methods
from edgepeft.delta.format import Delta, DeltaMeta, delta_bytes
from edgepeft.delta.ranks import bundle_rank, rebase, refit
from edgepeft.delta.transport import pack
from edgepeft.errors import HubError
from edgepeft.manifest import Manifest


def check_ranks(ranks: Iterable[int], manifest: Manifest) -> tuple[int, ...]:
    """The ranks a fleet may allow, sorted; refused when the bundle cannot train them (no LoRA, above its rank, DoRA)."""
    out = tuple(sorted({int(r) for r in ranks}))
    if not out:
        return out
    full = bundle_rank(manifest)
    if not full:
        raise HubError(f"ranks {list(out)}: the bundle has no LoRA slots; a fleet of method {manifest.method} has no rank to choose")
    if out[0] < 1 or out[-1] > full:
        raise HubError(f"ranks {list(out)}: each must be 1..{full} (the bundle's LoRA rank); export the bundle at the largest rank")
    if any(methods.owner(s.kind).needs_base for s in manifest.slots if s.rank):
        raise HubError(f"ranks {list(out)}: {manifest.method}'s update depends on the base weights, so its ranks do not mix "
                       "in ΔW space; mixed ranks need plain LoRA")
    return out


def allowed(fleet_ranks: tuple[int, ...], manifest: Manifest) -> tuple[int, ...]:
    """Ranks a fleet's devices may train at: the fleet's list, else the bundle's rank alone."""
    full = bundle_rank(manifest)
    return fleet_ranks or ((full,) if full else ())


def refusal(meta: DeltaMeta, fleet_ranks: tuple[int, ...], manifest: Manifest) -> str | None:
    """Why the fleet refuses a delta of this rank (None: it takes it)."""
    ok = allowed(fleet_ranks, manifest)
    if not ok or meta.rank in ok:
        return None
    listed = ", ".join(map(str, ok))
    return (f"delta has LoRA rank {meta.rank}, but this fleet takes rank{'s' if len(ok) > 1 else ''} {listed} of its "
            f"{manifest.method} bundle; train at one of them (edgepeft train --rank R, or rank = R under [train] in device.toml)")


def measured_from_start(d: Delta, full: int, start: Callable[[int, int], Delta | None],
                        parent: Delta | None) -> Delta:
    """``d`` rebased onto its full parent version when its device trained at a rank below the bundle's ``full``.

    ``start(version, rank)``: the version as that device pulled it at its rank. A first-round delta (no parent)
    or one at the full rank is its own update already.
    """
    if not d.meta.rank or d.meta.rank == full or parent is None:
        return d
    s = start(parent.meta.version, d.meta.rank)
    if s is None:
        raise HubError(f"delta of rank {d.meta.rank} from v{parent.meta.version}: that version has no rank-{d.meta.rank} form")
    return rebase(d, s, parent)


def rank_forms(version: Delta, ranks: Iterable[int], put_blob: Callable[[bytes], str]) -> dict[str, dict[str, object]]:
    """Store ``version`` refitted to each rank below its own: {rank: {sha256, size (packed, what devices pull),
    raw_sha256, raw_size, refit_error}}."""
    out: dict[str, dict[str, object]] = {}
    for r in ranks:
        if r == version.meta.rank:
            continue
        d, err = refit(version, r)
        wire, raw = pack(d), delta_bytes(d)
        out[str(r)] = {"sha256": put_blob(wire), "size": len(wire), "raw_sha256": put_blob(raw), "raw_size": len(raw),
                       "refit_error": round(err, 6)}
    return out
