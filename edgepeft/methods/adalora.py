"""AdaLoRA (PEFT's ``AdaLoraConfig``): an SVD-form update ``y = base(x) + s·(x (P·λ)ᵀ) Qᵀ`` whose ranks the device prunes.

P (r, in), λ (r,), Q (out, r) are PEFT's lora_A, lora_E, lora_B; s = alpha / init_r is PEFT's ``scaling / ranknum``
(PEFT adds 1e-5 to ranknum: a 2.5e-6 relative difference at r = 4, below every parity tolerance). The bundle's graphs
hold init_r ranks; the trainer prunes a triplet by zeroing its λ (PEFT's own masking, ``methods/adalora_budget.py``),
so one export serves every budget, and the delta that travels keeps only the surviving triplets: its ranks differ
per module and ``meta.rank`` stays init_r (PEFT's ``ranknum``, the scale's denominator).

Combinations are exact: a mix puts the triplets side by side (any rank per module), the hub averages ΔW = s·Q diag(λ) P
and re-factors it by SVD, which *is* this form (P the right singular vectors, λ the singular values / s, Q the left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from edgepeft.errors import DeltaError, ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import Method, MethodConfig, ModelView, Tensors, option, select
from edgepeft.names import ADA_A, ADA_B, ADA_E, slot_name


@dataclass(frozen=True)
class AdaLoraConfig(MethodConfig):
    init_r: int = option(12, "Initial rank of every target (PEFT's init_r); the graphs hold this many triplets.")
    target_r: int = option(8, "Average rank the budget ends at (PEFT's target_r): target_r x targets triplets survive.")
    alpha: float = option(8.0, "PEFT's lora_alpha; the update is (alpha / init_r) * Q diag(λ) P.")
    targets: tuple[str, ...] | None = option(None, "Module patterns (PEFT rules). Default: the family's LoRA targets.")
    tinit: int = option(0, "Steps of warmup before any pruning (PEFT's tinit).")
    tfinal: int = option(0, "Steps at the end that train the final ranks without pruning (PEFT's tfinal).")
    deltaT: int = option(1, "Steps between two budget allocations (PEFT's deltaT).")
    beta1: float = option(0.85, "EMA factor of the sensitivity (PEFT's beta1).")
    beta2: float = option(0.85, "EMA factor of the uncertainty (PEFT's beta2).")
    orth_reg_weight: float = option(0.5, "Weight of the orthogonality regularization ‖PPᵀ-I‖+‖QᵀQ-I‖ in the train graph's loss.")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ExportError:
            return ExportError(f"--method-config adalora.{key}: {why}")

        if self.init_r <= 0:
            raise bad("init_r", f"must be a positive integer, got {self.init_r}")
        if not 0 < self.target_r <= self.init_r:
            raise bad("target_r", f"must lie in 1..init_r ({self.init_r}), got {self.target_r}")
        for key in ("tinit", "tfinal"):
            if getattr(self, key) < 0:
                raise bad(key, f"must not be negative, got {getattr(self, key)}")
        if self.deltaT < 1:
            raise bad("deltaT", f"must be at least 1, got {self.deltaT}")
        for key in ("beta1", "beta2"):
            if not 0 < getattr(self, key) < 1:
                raise bad(key, f"must lie strictly between 0 and 1 (PEFT asserts it), got {getattr(self, key)}")
        if not (math.isfinite(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise bad("orth_reg_weight", f"must be a finite number >= 0, got {self.orth_reg_weight}")
        if not math.isfinite(self.alpha):
            raise bad("alpha", f"must be a finite number, got {self.alpha}")


def triplets(tensors: Tensors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, λ, Q) of one module's AdaLoRA slots."""
    return tensors[ADA_A], tensors[ADA_E], tensors[ADA_B]


class AdaLora(Method):
    name = "adalora"
    kinds = (ADA_A, ADA_E, ADA_B)
    config_cls = AdaLoraConfig
    ranked = True
    varied_ranks = True  # pruning leaves each module its own rank
    peft_type = "ADALORA"
    peft_keys = {ADA_A: "lora_A", ADA_E: "lora_E", ADA_B: "lora_B"}  # PEFT's ParameterDicts: no ".weight"
    peft_rank = "init_r"

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        assert isinstance(config, AdaLoraConfig)
        r, alpha = config.init_r, float(config.alpha)
        slots: list[Slot] = []
        for name in select(view, config.targets or view.default("lora.targets"), self.name, "targets"):
            if view.groups.get(name, 1) > 1 or name in view.norms:
                raise ExportError(f"--method-config adalora.targets: {name} is not a plain linear or convolution layer")
            fin, fout = view.linears[name]
            if r > min(fin, fout):
                raise ExportError(f"--method-config adalora.init_r: {r} is above the width of {name} ({fin} -> {fout}); "
                                  f"choose at most {min(fin, fout)}")
            slots += [Slot(slot_name(name, ADA_A), ADA_A, name, (r, fin), rank=r, alpha=alpha, init="normal"),
                      Slot(slot_name(name, ADA_E), ADA_E, name, (r,), rank=r, alpha=alpha, init="zeros"),
                      Slot(slot_name(name, ADA_B), ADA_B, name, (fout, r), rank=r, alpha=alpha, init="normal")]
        return slots

    # ---- per slot: a dynamic rank, like LoRA -----------------------------------------------------

    def ndim(self, kind: str) -> int:
        return 1 if kind == ADA_E else 2

    def infer_axis(self, kind: str) -> int | None:
        return 1 if kind == ADA_B else 0

    def neutral(self, slot: Slot) -> np.ndarray:
        shape = list(slot.shape)
        shape[self.infer_axis(slot.kind)] = 0
        return np.zeros(shape, np.float32)

    def init(self, slot: Slot, rng: np.random.Generator) -> np.ndarray:
        if slot.init == "normal":  # PEFT: P, Q ~ N(0, 0.02²), λ = 0, so training starts at the base model
            return (rng.standard_normal(slot.shape) * 0.02).astype(np.float32)
        return super().init(slot, rng)

    def check_shape(self, slot: Slot, got: tuple[int, ...], for_training: bool) -> str | None:
        axis = self.infer_axis(slot.kind)
        fixed_ok = len(got) == len(slot.shape) and all(g == s for i, (g, s) in enumerate(zip(got, slot.shape)) if i != axis)
        # fewer triplets than init_r: a pruned delta; training pads them with zeros (delta/ranks.pad_rank)
        if fixed_ok and got[axis] <= slot.rank:
            return None
        need = ["r" if i == axis else str(s) for i, s in enumerate(slot.shape)]
        return "(" + ", ".join(need) + ("," if len(need) == 1 else "") + f") with r at most {slot.rank}"

    def check_module(self, module: str, tensors: Tensors, meta_rank: int, where: str) -> None:
        missing = [k for k in self.kinds if k not in tensors]
        if missing:
            raise DeltaError(f"{where}: module {module!r}: AdaLoRA needs P, λ and Q; {slot_name(module, missing[0])!r} is missing")
        p, e, q = triplets(tensors)
        if not p.shape[0] == e.shape[0] == q.shape[1]:
            raise DeltaError(f"{where}: module {module!r}: AdaLoRA P, λ, Q have {p.shape[0]}, {e.shape[0]}, {q.shape[1]} ranks")
        if p.shape[0] > meta_rank:
            raise DeltaError(f"{where}: module {module!r}: {p.shape[0]} AdaLoRA ranks, above metadata 'rank' (init_r) {meta_rank}")

    # ---- inference mixes: triplets side by side, the scale and weight folded into Q --------------

    def fold(self, slot: Slot, t: np.ndarray, scale: float) -> np.ndarray:
        return t * np.float32(scale) if slot.kind == ADA_B and scale != 1.0 else t

    def mix(self, slot: Slot, parts: list[np.ndarray], weights: list[float], scales: list[float]) -> np.ndarray:
        if slot.kind == ADA_B:
            parts = [t * np.float32(w * s) if w * s != 1.0 else t for t, w, s in zip(parts, weights, scales)]
        return np.ascontiguousarray(np.concatenate(parts, self.infer_axis(slot.kind)), np.float32)

    # ---- PEFT mapping ---------------------------------------------------------------------------------

    def to_peft(self, kind: str, t: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
        return t[:, None] if kind == ADA_E else t  # PEFT's lora_E is (r, 1)

    def from_peft(self, kind: str, v: np.ndarray, weight: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        return v.reshape(-1) if kind == ADA_E else v

    def peft_fields(self, modules: Mapping[str, Tensors], options: Mapping[str, Any]) -> dict[str, Any]:
        cfg = AdaLoraConfig.from_options(options, self.name)
        # PEFT keeps the kept triplets only and a rank_pattern of init_r booleans per module; which positions survived
        # does not matter (triplets are unordered), so the kept ones come first.
        pattern = {f"{m}.lora_E": [i < t[ADA_E].shape[0] for i in range(cfg.init_r)] for m, t in sorted(modules.items())}
        # "r" is LoraConfig's, unused by AdaLoRA: PEFT warns on anything but its default 8
        return {"init_r": cfg.init_r, "target_r": cfg.target_r, "r": 8, "lora_alpha": cfg.alpha, "tinit": cfg.tinit,
                "tfinal": cfg.tfinal, "deltaT": cfg.deltaT, "beta1": cfg.beta1, "beta2": cfg.beta2,
                "orth_reg_weight": cfg.orth_reg_weight, "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
                # PEFT refuses a config without a budgeting phase; the run's own steps are in the delta's metadata
                "total_step": cfg.tinit + cfg.tfinal + 1, "rank_pattern": pattern}

    def check_peft_config(self, cfg: Mapping[str, Any], options: Mapping[str, Any], where: str) -> None:
        want = AdaLoraConfig.from_options(options, self.name)
        if cfg.get("init_r") != want.init_r:
            raise DeltaError(f"{where}: 'init_r' is {cfg.get('init_r')!r}; the bundle's AdaLoRA slots hold {want.init_r}")

    # ---- device training: the rank budget -------------------------------------------------------------

    def train_hook(self, slots: list[Slot], options: Mapping[str, Any], total_steps: int) -> Any:
        from edgepeft.methods.adalora_budget import RankBudget

        return RankBudget(AdaLoraConfig.from_options(options, self.name), slots, total_steps)

    # ---- hub aggregation: ΔW space, re-factored by SVD into (P, λ, Q) ---------------------------------

    def to_space(self, module: str, tensors: Tensors, scale: float, base: np.ndarray | None = None) -> dict[str, np.ndarray]:
        p, e, q = (t.astype(np.float64) for t in triplets(tensors))
        return {f"{module}:dW": scale * (q * e) @ p}

    def from_space(self, module: str, space: dict[str, np.ndarray], rank: int, scale: float,
                   base: np.ndarray | None = None) -> tuple[Tensors, float]:
        dw = space[f"{module}:dW"]
        u, s, vt = np.linalg.svd(dw, full_matrices=False)
        k = min(rank, s.size)
        p, e, q = np.zeros((rank, dw.shape[1])), np.zeros(rank), np.zeros((dw.shape[0], rank))
        p[:k], e[:k], q[:, :k] = vt[:k], s[:k] / scale, u[:, :k]
        out = {ADA_A: p.astype(np.float32), ADA_E: e.astype(np.float32), ADA_B: q.astype(np.float32)}
        norm = np.linalg.norm(dw)
        err = float(np.linalg.norm(dw - self.to_space(module, out, scale)[f"{module}:dW"]))
        return out, err / norm if norm > 0 else err

    def lerp(self, module: str, parent: Tensors | None, delta: Tensors, lam: float, scales: tuple[float, float],
             base: np.ndarray | None = None) -> Tensors:
        # exact without forming ΔW: the parent's triplets beside the delta's, λ weighted (1-λ)·(s_p/s) and λ
        p, e, q = triplets(delta)
        if parent is None:
            return {ADA_A: p, ADA_E: (lam * e).astype(np.float32), ADA_B: q}
        pp, pe, pq = triplets(parent)
        return {ADA_A: np.concatenate([pp, p]).astype(np.float32), ADA_B: np.concatenate([pq, q], 1).astype(np.float32),
                ADA_E: np.concatenate([(1 - lam) * scales[1] / scales[0] * pe, lam * e]).astype(np.float32)}


ADALORA = register(AdaLora())
