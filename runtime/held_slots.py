"""Which delta slots a run trains: every one, or those ``--select auto`` chose; the rest are held at their neutral value.

A held slot is fed to the train graph at its method's neutral value and never moves: the train session is not asked
for its gradient (a cut graph has none, edgepeft/onnx_prune.py), the optimizer sees a zero gradient for it, and after
every update it is put back (weight decay would move an IA3 scale off 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgepeft import methods
from edgepeft.manifest import Slot
from edgepeft.names import LOSS, grad_name, split_slot_name
from edgepeft.runtime.data import plan_batches
from edgepeft.runtime.select import PROBE_STEPS, Selection, choose, probe_scores


@dataclass(frozen=True)
class HeldSlots:
    """The slots of one run, split into trained and held (neutral) ones."""

    slots: tuple[Slot, ...]
    held: tuple[str, ...] = ()  # manifest order

    @classmethod
    def holding(cls, slots: tuple[Slot, ...], selection: Selection | None) -> HeldSlots:
        """Every slot outside ``selection`` held (None: none held)."""
        if selection is None:
            return cls(slots)
        return cls(slots, tuple(s.name for s in slots if not selection.trains(s)))

    @property
    def trained(self) -> list[str]:
        """Names of the slots whose gradients a step asks for, in manifest order."""
        held = set(self.held)
        return [s.name for s in self.slots if s.name not in held]

    def outputs(self) -> list[str] | None:
        """The train graph's outputs the run needs (None: all of them, the graph as exported)."""
        return [LOSS] + [grad_name(n) for n in self.trained] if self.held else None

    def with_zeros(self, grads: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``grads`` of the trained slots plus a zero gradient for every held one (what the optimizer steps on)."""
        return {**grads, **{n: np.zeros_like(params[n]) for n in self.held}}

    def hold(self, params: dict[str, np.ndarray]) -> None:
        """Put every held slot of ``params`` back at its method's neutral value, in place."""
        for n in self.held:
            kind = split_slot_name(n)[1]
            params[n][...] = methods.owner(kind).fill(kind)


def probe_selection(slots: tuple[Slot, ...], grads_of: Callable[[np.ndarray], dict[str, np.ndarray]],
                    lengths: np.ndarray, batch_size: int, seed: int, max_bytes: int) -> Selection:
    """--select auto's choice: the probe's scores on the first PROBE_STEPS batches of an order of its own (seed + 1,
    so the run's own data order is not consumed), then the best modules that fit ``max_bytes``."""
    probe = plan_batches(lengths, batch_size, np.random.default_rng(seed + 1))[:PROBE_STEPS]
    return choose(slots, probe_scores(slots, grads_of, probe), max_bytes, len(probe))
