"""Delta tensors to graph feeds, each slot as its method declares (``Method.neutral`` and ``Method.mix``).

The inference graph has no LoRA scale and takes a LoRA rank that may differ per call, so: no delta =
rank-0 A and B (exactly the base), a delta = A and ``scale * B``, and a mix of deltas = A stacked
along the rank and each ``weight * scale * B`` stacked beside it, which is ``sum_i w_i s_i B_i A_i``
in one pass. Vector slots mix as ``neutral + sum_i w_i (t_i - neutral)``; a method that cannot mix
(DoRA) refuses more than one delta. The training graph takes the slots as they are.

A delta used many times can be turned into its feeds once (:func:`prepare`); a prepared delta alone
at weight 1 is then fed as it is, with no per-call copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from edgepeft.manifest import Manifest, neutral_values
from edgepeft.methods import owner


class DeltaLike(Protocol):
    tensors: dict[str, np.ndarray]

    @property
    def scale(self) -> float: ...


@dataclass(frozen=True)
class PreparedDelta:
    """A delta in inference-feed form: every slot float32, C-contiguous and aligned, LoRA B already times its scale."""

    tensors: dict[str, np.ndarray]
    scale: float = 1.0  # the scale is inside B, so a mix multiplies by 1

    @property
    def nbytes(self) -> int:
        """Bytes the feed arrays span (views of a memory-mapped file count too)."""
        return sum(int(t.nbytes) for t in self.tensors.values())


def prepare(manifest: Manifest, delta: DeltaLike) -> PreparedDelta:
    """The feeds of ``delta`` at weight 1, computed once: A and bias/head slots as they are (no copy when
    already float32, contiguous and aligned, e.g. views of a memory-mapped file), B times the scale."""
    out = {}
    for s in manifest.slots:
        t = owner(s.kind).fold(s, delta.tensors[s.name], delta.scale)  # LoRA: B times s; others as they are
        out[s.name] = np.require(t, np.float32, ["C", "A"])
    return PreparedDelta(out)


def neutral_feeds(manifest: Manifest) -> dict[str, np.ndarray]:
    """Feeds that make the inference graph compute the base model: rank-0 LoRA, zero bias/weight deltas."""
    return neutral_values(manifest.slots)


def infer_feeds(manifest: Manifest, deltas: Sequence[DeltaLike] = (), weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Inference-graph feeds for a weighted mix of deltas (one delta with weight 1 is the usual case)."""
    if not deltas:
        return neutral_feeds(manifest)
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(deltas) == 1 and isinstance(deltas[0], PreparedDelta) and weights == [1.0]:
        return dict(deltas[0].tensors)  # already feeds: no copy
    scales = [d.scale for d in deltas]
    return {s.name: owner(s.kind).mix(s, [d.tensors[s.name] for d in deltas], weights, scales) for s in manifest.slots}


def after_prefill(manifest: Manifest, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The slot feeds of a causal LM's calls after the first: its KV cache now holds the virtual tokens (prompts,
    prefixes), so they are fed empty; every other slot as before."""
    virtual = {s.name: owner(s.kind).neutral(s) for s in manifest.slots if owner(s.kind).virtual and s.name in feeds}
    return {**feeds, **virtual} if virtual else feeds
