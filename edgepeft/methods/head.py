"""The classifier head: a full additive weight delta ``y = base(x) + x dWᵀ`` plus a bias delta (BitFit's kind).

Export adds it to every classification bundle; ``--method ia3+head`` names it explicitly. Neutral zero,
mixed by weighted sum, averaged as is. PEFT keeps such a module whole (``modules_to_save``).
"""

from __future__ import annotations

from edgepeft.errors import ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import Method, MethodConfig, ModelView
from edgepeft.names import BIAS, CLASSIFICATION, WEIGHT, slot_name


class Head(Method):
    name = "head"
    kinds = (WEIGHT,)
    auto_tasks = CLASSIFICATION

    def ndim(self, kind: str) -> int:
        return 2

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        wanted = view.default("head.modules")
        found = [n for n in view.linears if n in wanted]
        if not found:
            raise ExportError(f"no classifier head found (looked for {', '.join(wanted)})")
        slots = []
        for name in found:
            fin, fout = view.linears[name]
            slots += [Slot(slot_name(name, WEIGHT), WEIGHT, name, (fout, fin)), Slot(slot_name(name, BIAS), BIAS, name, (fout,))]
        return slots


HEAD = register(Head())
