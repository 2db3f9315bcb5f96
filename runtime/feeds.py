"""Delta tensors to graph feeds.

The inference graph computes ``y += (x @ A.T) @ B.T`` with no scale and a LoRA rank that may differ
per call, so: no delta = rank-0 A and B (exactly the base), a delta = A and ``scale * B``, and a mix
of deltas = A stacked along the rank and each ``weight * scale * B`` stacked beside it, which is
``sum_i w_i s_i B_i A_i`` in one pass. The training graph takes A and B as they are.

A delta used many times can be turned into its feeds once (:func:`prepare`); a prepared delta alone
at weight 1 is then fed as it is, with no per-call copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from edgepeft.manifest import Manifest, neutral_values
from edgepeft.names import LORA_A, LORA_B


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
        t = delta.tensors[s.name]
        if s.kind == LORA_B and delta.scale != 1.0:
            t = t * np.float32(delta.scale)
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
    out = {}
    for s in manifest.slots:
        if s.kind == LORA_A:
            out[s.name] = np.ascontiguousarray(np.concatenate([d.tensors[s.name] for d in deltas], 0), np.float32)
        elif s.kind == LORA_B:
            parts = [d.tensors[s.name] * np.float32(w * d.scale) for d, w in zip(deltas, weights)]
            out[s.name] = np.ascontiguousarray(np.concatenate(parts, 1), np.float32)
        else:
            out[s.name] = sum((d.tensors[s.name] * np.float32(w) for d, w in zip(deltas, weights)),
                              np.zeros(s.shape, np.float32)).astype(np.float32)
    return out
