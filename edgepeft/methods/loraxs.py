"""An r×r core in the manner of LoRA-XS: ``y = base(x) + ((x Vᵀ) Rᵀ) Uᵀ``, only R (r, r) trained.

U = U_r S_r (out, r) and Vᵀ = V_rᵀ (r, in) come from a truncated SVD of each target's own weight,
taken once at export and stored in the bundle as frozen weights (exporters/methods/loraxs.py); the
delta that travels is r² floats per target (r = 8 on query and value of 2 layers: 2 KB).

ΔW = U R Vᵀ is linear in R, so every combination is exact in R itself: neutral zeros, a mix is the
weighted sum of R, the hub averages R (the default of :class:`Method`).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgepeft.errors import ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import Method, MethodConfig, ModelView, option, select
from edgepeft.names import XS_R, slot_name


@dataclass(frozen=True)
class LoraXSConfig(MethodConfig):
    rank: int = option(8, "Rank r of the truncated SVD; R is r×r. At most the smaller width of every target.")
    targets: tuple[str, ...] | None = option(None, "Module patterns (PEFT rules). Default: the family's LoRA targets.")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ExportError(f"--method-config loraxs.rank: rank must be a positive integer, got {self.rank}")


class LoraXS(Method):
    name = "loraxs"
    kinds = (XS_R,)
    config_cls = LoraXSConfig

    def ndim(self, kind: str) -> int:
        return 2

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        assert isinstance(config, LoraXSConfig)
        slots = []
        for name in select(view, config.targets or view.default("lora.targets"), self.name, "targets"):
            fin, fout = view.linears[name]
            if config.rank > min(fin, fout):
                raise ExportError(f"--method-config loraxs.rank: {config.rank} is above the width of {name} "
                                  f"({fin} -> {fout}); choose at most {min(fin, fout)}")
            slots.append(Slot(slot_name(name, XS_R), XS_R, name, (config.rank, config.rank)))
        return slots


LORAXS = register(LoraXS())
