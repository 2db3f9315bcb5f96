"""IA3 (PEFT's ``IA3Config``): learned scales on keys, values and the feed-forward input.

An output target computes ``y = base(x) * l`` (l of shape (out,)); a feed-forward target
``y = base(x * l)`` (l of shape (in,)). Neutral: ones. A mix is ``1 + Σ wᵢ(lᵢ − 1)`` (a weight of 0 is
the base model; weights summing to 1 give PEFT's weighted sum); the hub averages the scales as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepeft.errors import ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import Method, MethodConfig, ModelView, matches, option, select
from edgepeft.names import IA3_FF, IA3_L, slot_name


@dataclass(frozen=True)
class IA3Config(MethodConfig):
    targets: tuple[str, ...] | None = option(None, "Module patterns that get a scale (PEFT's target_modules). Default: "
                                                  "key,value,output.dense (BERT), k_proj,v_proj,down_proj (Llama), c_attn,mlp.c_proj (GPT-2).")
    feedforward: tuple[str, ...] | None = option(None, "Which of the targets scale their input rather than their output "
                                                      "(PEFT's feedforward_modules). Default: the family's feed-forward output projection.")

    def __post_init__(self) -> None:
        if self.targets is not None and self.feedforward is not None:
            extra = [p for p in self.feedforward if p not in self.targets]
            if extra:
                raise ExportError(f"--method-config ia3.feedforward: {', '.join(extra)} not among ia3.targets; "
                                  "feed-forward modules must be targets too (as in PEFT)")


class IA3(Method):
    name = "ia3"
    kinds = (IA3_L, IA3_FF)
    config_cls = IA3Config
    peft_type = "IA3"
    peft_keys = {IA3_L: "ia3_l", IA3_FF: "ia3_l"}

    def peft_config(self, modules, options):
        return {"feedforward_modules": sorted(m for m, kinds in modules.items() if IA3_FF in kinds), "init_ia3_weights": True}

    def to_peft(self, kind, t, weight):
        return t[None, :] if kind == IA3_FF else t[:, None]  # PEFT: (1, in) on a feed-forward input, (out, 1) on an output

    def from_peft(self, kind, v, weight, shape):
        return v.reshape(shape) if v.size == int(np.prod(shape)) else v

    def fill(self, kind: str) -> float:
        return 1.0

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        assert isinstance(config, IA3Config)
        ff = config.feedforward if config.feedforward is not None else view.default("ia3.feedforward")
        slots = []
        for name in select(view, config.targets or view.default("ia3.targets"), self.name, "targets"):
            fin, fout = view.linears[name]
            is_ff = any(matches(name, p) for p in ff)
            kind = IA3_FF if is_ff else IA3_L
            slots.append(Slot(slot_name(name, kind), kind, name, (fin if is_ff else fout,), init="ones"))
        return slots


IA3_METHOD = register(IA3())
