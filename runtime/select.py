"""Gradient-guided selection (``edgepeft train --select auto``): which modules to train under a delta byte budget.

A short probe runs the bundle's train graph (the all-layers one: one export serves every choice) on a few batches
of the local data with the starting delta and sums each slot's squared gradient (the empirical Fisher diagonal's
trace). A module's score is the sum over its slots; slots outside the layers (the head, virtual tokens) are always
trained. The choice is greedy by score among the modules whose float32 bytes still fit ``--max-delta-bytes``; the
trainer then feeds the method's neutral value for every other slot and never updates it.

The run then trains on a copy of the graph cut to the loss and the trained gradients (``edgepeft/onnx_prune.py``):
onnxruntime runs every node of a graph whatever outputs a run asks for, so only the cut copy stops the backward pass
at the deepest chosen slot and skips the held slots' gradients. The memory plan (``--memory-budget``) is made on the
cut copy. What the byte budget chooses decides the depth; the depth is not itself searched against the memory budget.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from edgepeft.errors import TrainError
from edgepeft.manifest import Slot

PROBE_STEPS = 4  # batches the probe measures: enough to rank modules, a few seconds on a device
_LAYER = re.compile(r"\.(\d+)(?:\.|$)")


def layer_of(module: str) -> int | None:
    """The layer index in a module path (``bert.encoder.layer.3.attention...`` -> 3), None outside the layers."""
    m = _LAYER.search(module)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Selection:
    """The probe's choice: modules to train (others held neutral), their scores and bytes."""

    modules: tuple[str, ...]  # chosen layer modules, best score first
    always: tuple[str, ...]  # modules outside the layers, always trained (the head)
    scores: Mapping[str, float]  # every layer module's probe score
    delta_bytes: int  # float32 bytes of every trained slot
    probe_steps: int

    @property
    def layers(self) -> list[int]:
        return sorted({layer_of(m) for m in self.modules})  # type: ignore[type-var]

    def trains(self, slot: Slot) -> bool:
        return slot.module in self.modules or slot.module in self.always

    def describe(self) -> str:
        layers = self.layers
        return (f"--select auto: {len(self.modules)} of {len(self.scores)} modules in layers {layers or 'none'} "
                f"(deepest {layers[0] if layers else '-'}), {self.delta_bytes} bytes of float32 deltas, "
                f"from {self.probe_steps} probe steps")

    def metadata(self) -> dict[str, str]:
        return {"select": json.dumps({"modules": list(self.modules), "layers": self.layers, "delta_bytes": self.delta_bytes,
                                      "probe_steps": self.probe_steps}, sort_keys=True)}


def choose(slots: Iterable[Slot], scores: Mapping[str, float], max_bytes: int, probe_steps: int) -> Selection:
    """The best-scoring layer modules whose slots fit ``max_bytes`` (float32) beside the always-trained ones (pure)."""
    size: dict[str, int] = {}
    for s in slots:
        size[s.module] = size.get(s.module, 0) + 4 * int(np.prod(s.shape))
    always = tuple(sorted(m for m in size if layer_of(m) is None))
    used = sum(size[m] for m in always)
    layered = sorted((m for m in size if layer_of(m) is not None), key=lambda m: (-scores.get(m, 0.0), m))
    if not layered:
        raise TrainError("--select auto: the bundle has no slots in its layers to choose among; train without --select")
    cheapest = min(size[m] for m in layered)
    if used + cheapest > max_bytes:
        raise TrainError(f"--max-delta-bytes {max_bytes}: no module fits (the always-trained {', '.join(always) or 'slots'} "
                         f"take {used} bytes, the smallest module {cheapest}); raise it to at least {used + cheapest}")
    chosen = []
    for m in layered:
        if used + size[m] <= max_bytes:
            chosen.append(m)
            used += size[m]
    return Selection(tuple(chosen), always, {m: float(scores.get(m, 0.0)) for m in layered}, used, probe_steps)


def probe_scores(slots: Iterable[Slot], grads_of: Callable[[np.ndarray], dict[str, np.ndarray]],
                 batches: list[np.ndarray]) -> dict[str, float]:
    """Per module, the sum of its slots' squared gradients over ``batches`` (``grads_of(index)``: slot -> gradient)."""
    module = {s.name: s.module for s in slots}
    out: dict[str, float] = {}
    for index in batches:
        for name, g in grads_of(index).items():
            out[module[name]] = out.get(module[name], 0.0) + float(np.square(g, dtype=np.float64).sum())
    return out
