"""DoRA (PEFT's ``LoraConfig(use_dora=True)``): a magnitude per output row times the LoRA-updated direction.

    y = g ⊙ (x Wᵀ + s·(x Aᵀ)Bᵀ) + b,   g = m / ‖W + s·B A‖_row   (the norm detached, as PEFT does)

The magnitude travels as ``dm = m − ‖W‖_row`` (slot kind ``dora_m``), so a fresh or neutral delta is
zeros like every other slot and needs no base weights on the device; PEFT's magnitude is ``‖W‖ + dm``.

Mixing: refused. The dense weight of a DoRA delta is ``diag(g)(W + ΔV)``; a weighted sum of the
parameters (ranks side by side, magnitudes summed) is not the weighted sum of those weights, and the
exact mix needs each delta's ‖W + ΔVᵢ‖, which the inference graph does not have per delta.

Aggregation, exact in the dense space: the hub averages gᵢ − 1 and gᵢ·ΔVᵢ (ΔV = s·B A). With
G = Σ wᵢgᵢ and M = Σ wᵢgᵢΔVᵢ, the mean of the dense weights is ``diag(G) W + M = diag(G)(W + M/G)``:
a DoRA delta with direction ΔV̄ = M/G (re-factored to the rank) and magnitude G·‖W + ΔV̄‖. Both need
the module's frozen weight (``needs_base``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgepeft.errors import DeltaError, ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import MethodConfig, ModelView, Tensors, option, select
from edgepeft.methods.lora import LowRank, refactor
from edgepeft.names import DORA_A, DORA_B, DORA_M, slot_name


@dataclass(frozen=True)
class DoraConfig(MethodConfig):
    rank: int = option(8, "Rank r of the direction update.")
    alpha: float | None = option(None, "Alpha; the direction update is (alpha/r)·B·A. Default: 2·rank.")
    targets: tuple[str, ...] | None = option(None, "Module name patterns (PEFT rules). Default: the family's LoRA targets.")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ExportError(f"--method-config dora.rank: rank must be a positive integer, got {self.rank}")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ExportError(f"--method-config dora.alpha: must be a finite number, got {self.alpha}")


def row_norm(w: np.ndarray) -> np.ndarray:
    """‖w‖₂ of every row, float64."""
    return np.linalg.norm(w.astype(np.float64), axis=1)


class Dora(LowRank):
    name = "dora"
    kinds = (DORA_A, DORA_B, DORA_M)
    a_kind, b_kind = DORA_A, DORA_B
    config_cls = DoraConfig
    peft_type = "LORA"  # with use_dora=True
    mixable = False
    needs_base = True
    peft_keys = {DORA_A: "lora_A.weight", DORA_B: "lora_B.weight", DORA_M: "lora_magnitude_vector"}

    def peft_config(self, modules, options):
        return {"use_dora": True}

    def to_peft(self, kind: str, t: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
        return (row_norm(self._base(weight, "to-peft")) + t).astype(np.float32) if kind == DORA_M else t

    def from_peft(self, kind: str, v: np.ndarray, weight: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        return (v.astype(np.float64) - row_norm(self._base(weight, "from-peft"))).astype(np.float32) if kind == DORA_M else v

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        assert isinstance(config, DoraConfig)
        alpha = float(config.alpha if config.alpha is not None else 2 * config.rank)
        slots: list[Slot] = []
        for name in select(view, config.targets or view.default("lora.targets"), self.name, "targets"):
            fin, fout = view.linears[name]
            slots += self.low_rank_slots(name, fin, fout, config.rank, alpha)
            slots.append(Slot(slot_name(name, DORA_M), DORA_M, name, (fout,)))
        return slots

    def ndim(self, kind: str) -> int:
        return 1 if kind == DORA_M else 2

    def gain(self, tensors: Tensors, scale: float, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(g per output row, ΔV = s·B A), float64: the delta's dense weight is diag(g)(W + ΔV)."""
        dv = self.delta_w(tensors, scale)
        g = (row_norm(base) + tensors[DORA_M].astype(np.float64)) / row_norm(base + dv)
        return g, dv

    def dense(self, tensors: Tensors, scale: float, base: np.ndarray) -> np.ndarray:
        """The module's effective weight diag(g)(W + ΔV), (out, in), float64 (what PEFT merges into the layer)."""
        g, dv = self.gain(tensors, scale, base)
        return g[:, None] * (base + dv)

    def _base(self, base: np.ndarray | None, module: str) -> np.ndarray:
        if base is None:
            raise DeltaError(f"dora ({module}): DoRA's magnitude is relative to the base weights; give the bundle "
                             "with its weights file (CLI: --bundle)")
        return base

    def to_space(self, module: str, tensors: Tensors, scale: float, base: np.ndarray | None = None) -> dict[str, np.ndarray]:
        g, dv = self.gain(tensors, scale, self._base(base, module))
        return {f"{module}:dora_g": g - 1.0, f"{module}:dora_gdV": g[:, None] * dv}  # neutral: both zero

    def to_space_factored(self, module: str, tensors: Tensors, scale: float, base: np.ndarray | None = None
                          ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
        return self.to_space(module, tensors, scale, base), {}  # DoRA's parts are not plain products

    def from_space(self, module: str, space: dict[str, np.ndarray], rank: int, scale: float,
                   base: np.ndarray | None = None) -> tuple[Tensors, float]:
        w = self._base(base, module)
        g = space[f"{module}:dora_g"] + 1.0
        safe = np.where(g != 0.0, g, 1.0)
        direction = np.where((g != 0.0)[:, None], space[f"{module}:dora_gdV"] / safe[:, None], 0.0)
        a, b, err = refactor(direction, rank, scale)
        dv = scale * (b.astype(np.float64) @ a.astype(np.float64))
        dm = g * row_norm(w + dv) - row_norm(w)
        return {DORA_A: a, DORA_B: b, DORA_M: dm.astype(np.float32)}, err

    def lerp(self, module: str, parent: Tensors | None, delta: Tensors, lam: float, scales: tuple[float, float],
             base: np.ndarray | None = None) -> Tensors:
        # Exact in the dense space: at the sum of both ranks the re-factoring loses nothing.
        mine = self.to_space(module, delta, scales[0], base)
        theirs = {k: np.zeros_like(v) for k, v in mine.items()} if parent is None else self.to_space(module, parent, scales[1], base)
        rank = delta[DORA_A].shape[0] + (0 if parent is None else parent[DORA_A].shape[0])
        out, _ = self.from_space(module, {k: theirs[k] + lam * (mine[k] - theirs[k]) for k in mine}, rank, scales[0], base)
        return out


DORA = register(Dora())
