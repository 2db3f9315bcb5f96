"""LoRA: ``y = base(x) + s·(x Aᵀ)Bᵀ`` with A (r, in), B (out, r), s = alpha / r.

Neutral: rank 0 (A ``(0, in)``, B ``(out, 0)``); the inference graph takes any rank, so a mix is the
ranks side by side (A stacked, each ``w·s·B`` beside the others) and computes ``Σ wᵢ sᵢ Bᵢ Aᵢ`` in one
pass. The hub averages ΔW = s·B@A (the mean of products is not the product of means) and re-factors
it to the bundle's rank by truncated SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgepeft.errors import DeltaError, ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import Method, MethodConfig, ModelView, Tensors, option, select
from edgepeft.names import LORA_A, LORA_B, slot_name


@dataclass(frozen=True)
class LoraConfig(MethodConfig):
    rank: int = option(8, "LoRA rank r.")
    alpha: float | None = option(None, "LoRA alpha; the update is (alpha/r)·B·A. Default: 2·rank.")
    targets: tuple[str, ...] | None = option(None, "Module name patterns (PEFT rules: suffix match, or a regex). "
                                                  "Default: the family's (query,value for BERT, q_proj,v_proj for Llama, c_attn for GPT-2).")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ExportError(f"--method-config lora.rank: rank must be a positive integer, got {self.rank}")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ExportError(f"--method-config lora.alpha: must be a finite number, got {self.alpha}")


def refactor(dw: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(A (rank, in), B (out, rank), relative error) with scale·B@A the best rank-``rank`` fit of ``dw``."""
    out_f, in_f = dw.shape
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    k = min(rank, s.size)
    a = np.zeros((rank, in_f))
    b = np.zeros((out_f, rank))
    root = np.sqrt(s[:k] / scale)
    a[:k] = root[:, None] * vt[:k]
    b[:, :k] = u[:, :k] * root
    # Directions with no signal would leave A and B both zero there, where gradients vanish and training
    # from this version could never use them: give A the unit singular direction at kaiming-init norm
    # (1/sqrt(3)) and keep B zero, which leaves ΔW unchanged.
    dead = np.flatnonzero(s[:k] <= (s[0] if s.size else 0.0) * 1e-7)
    a[dead] = vt[dead] / math.sqrt(3.0)
    b[:, dead] = 0.0
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    norm = np.linalg.norm(dw)
    err = np.linalg.norm(dw - scale * (b32.astype(np.float64) @ a32.astype(np.float64)))
    return a32, b32, float(err / norm) if norm > 0 else float(err)


class LowRank(Method):
    """The low-rank pair shared by LoRA-family methods: kinds ``(a_kind, b_kind)``, checks, mixes, ΔW space."""

    ranked = True
    a_kind: str
    b_kind: str

    def low_rank_slots(self, name: str, fin: int, fout: int, rank: int, alpha: float) -> list[Slot]:
        if rank > min(fin, fout):
            raise ExportError(f"--method-config {self.name}.rank: {rank} is above the width of {name} "
                              f"({fin} -> {fout}); choose at most {min(fin, fout)}")
        return [Slot(slot_name(name, self.a_kind), self.a_kind, name, (rank, fin), rank=rank, alpha=alpha, init="kaiming_uniform"),
                Slot(slot_name(name, self.b_kind), self.b_kind, name, (fout, rank), rank=rank, alpha=alpha, init="zeros")]

    def ndim(self, kind: str) -> int:
        return 2 if kind in (self.a_kind, self.b_kind) else 1

    def neutral(self, slot: Slot) -> np.ndarray:
        if slot.kind == self.a_kind:
            return np.zeros((0, slot.shape[1]), np.float32)
        if slot.kind == self.b_kind:
            return np.zeros((slot.shape[0], 0), np.float32)
        return super().neutral(slot)

    def infer_axis(self, kind: str) -> int | None:
        return {self.a_kind: 0, self.b_kind: 1}.get(kind)

    def check_shape(self, slot: Slot, got: tuple[int, ...], for_training: bool) -> str | None:
        if slot.kind not in (self.a_kind, self.b_kind):
            return super().check_shape(slot, got, for_training)
        is_a = slot.kind == self.a_kind
        r = got[0] if is_a else got[1]
        fixed = slot.shape[1] if is_a else slot.shape[0]
        have_fixed = got[1] if is_a else got[0]
        # a lower rank trains too: zero-padded to the bundle's rank, the padding keeps a zero gradient (delta/ranks.py)
        if have_fixed == fixed and (not for_training or 1 <= r <= slot.rank):
            return None
        need_r = str(slot.rank) if for_training else "r"
        need = f"({need_r}, {fixed})" if is_a else f"({fixed}, {need_r})"
        return need + (f" to train (rank at most {slot.rank})" if for_training and have_fixed == fixed else "")

    def check_module(self, module: str, tensors: Tensors, meta_rank: int, where: str) -> None:
        a, b = tensors.get(self.a_kind), tensors.get(self.b_kind)
        if a is None or b is None:
            have, other = (self.a_kind, self.b_kind) if b is None else (self.b_kind, self.a_kind)
            raise DeltaError(f"{where}: tensor {slot_name(module, have)!r} has no partner {slot_name(module, other)!r}")
        if a.shape[0] != b.shape[1]:
            raise DeltaError(f"{where}: module {module!r}: {self.a_kind} has rank {a.shape[0]} but {self.b_kind} has rank {b.shape[1]}")
        if a.shape[0] != meta_rank:
            raise DeltaError(f"{where}: module {module!r}: LoRA rank {a.shape[0]} but metadata 'rank' is {meta_rank}")

    def fold(self, slot: Slot, t: np.ndarray, scale: float) -> np.ndarray:
        return t * np.float32(scale) if slot.kind == self.b_kind and scale != 1.0 else t

    def mix(self, slot: Slot, parts: list[np.ndarray], weights: list[float], scales: list[float]) -> np.ndarray:
        if slot.kind == self.a_kind and (self.mixable or (len(parts) == 1 and weights == [1.0])):
            return np.ascontiguousarray(np.concatenate(parts, 0), np.float32)
        if slot.kind == self.b_kind and (self.mixable or (len(parts) == 1 and weights == [1.0])):
            out = [t * np.float32(w * s) if w * s != 1.0 else t for t, w, s in zip(parts, weights, scales)]
            return np.ascontiguousarray(np.concatenate(out, 1), np.float32)
        return super().mix(slot, parts, weights, scales)

    def delta_w(self, tensors: Tensors, scale: float) -> np.ndarray:
        """The full update s·B@A, (out, in), float64."""
        return scale * (tensors[self.b_kind].astype(np.float64) @ tensors[self.a_kind].astype(np.float64))

    def to_space(self, module: str, tensors: Tensors, scale: float, base: np.ndarray | None = None) -> dict[str, np.ndarray]:
        rest = {k: t for k, t in tensors.items() if k not in (self.a_kind, self.b_kind)}
        return {f"{module}:dW": self.delta_w(tensors, scale), **super().to_space(module, rest, scale)}

    def to_space_factored(self, module: str, tensors: Tensors, scale: float, base: np.ndarray | None = None
                          ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
        rest = {k: t for k, t in tensors.items() if k not in (self.a_kind, self.b_kind)}
        product = (scale * tensors[self.b_kind].astype(np.float64), tensors[self.a_kind].astype(np.float64))
        return super().to_space(module, rest, scale), {f"{module}:dW": product}

    def from_space(self, module: str, space: dict[str, np.ndarray], rank: int, scale: float,
                   base: np.ndarray | None = None) -> tuple[Tensors, float]:
        rest = {k: v for k, v in space.items() if k != f"{module}:dW"}
        out, _ = super().from_space(module, rest, rank, scale)
        out[self.a_kind], out[self.b_kind], err = refactor(space[f"{module}:dW"], rank, scale)
        return out, err

    def lerp(self, module: str, parent: Tensors | None, delta: Tensors, lam: float, scales: tuple[float, float],
             base: np.ndarray | None = None) -> Tensors:
        # Exact without forming ΔW: A' = [A_p; A], B' = [(1-λ)·(s_p/s)·B_p, λ·B] at the delta's scale s, so
        # s·B'@A' = (1-λ)·ΔW_p + λ·ΔW. The rank is the sum of both ranks; a merge re-factors it.
        ab = (self.a_kind, self.b_kind)
        rest = super().lerp(module, None if parent is None else {k: v for k, v in parent.items() if k not in ab},
                            {k: v for k, v in delta.items() if k not in ab}, lam, scales)
        a, b = delta[self.a_kind], delta[self.b_kind]
        if parent is None:
            return {**rest, self.a_kind: a, self.b_kind: (lam * b).astype(np.float32)}
        ratio = scales[1] / scales[0]
        return {**rest, self.a_kind: np.concatenate([parent[self.a_kind], a], axis=0).astype(np.float32),
                self.b_kind: np.concatenate([(1 - lam) * ratio * parent[self.b_kind], lam * b], axis=1).astype(np.float32)}


class Lora(LowRank):
    name = "lora"
    kinds = (LORA_A, LORA_B)
    a_kind, b_kind = LORA_A, LORA_B
    config_cls = LoraConfig
    peft_type = "LORA"
    peft_keys = {LORA_A: "lora_A.weight", LORA_B: "lora_B.weight"}

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        assert isinstance(config, LoraConfig)
        alpha = float(config.alpha if config.alpha is not None else 2 * config.rank)
        slots: list[Slot] = []
        for name in select(view, config.targets or view.default("lora.targets"), self.name, "targets"):
            if view.groups.get(name, 1) > 1:  # PEFT's lora.Conv2d needs rank % groups == 0: no low-rank update there
                raise ExportError(f"--method-config lora.targets: {name} is a grouped (depthwise) convolution "
                                  f"(groups={view.groups[name]}); PEFT's LoRA on it needs the rank divisible by the groups, "
                                  "which is no low-rank update; target the 1x1 and full convolutions instead")
            fin, fout = view.linears[name]
            slots += self.low_rank_slots(name, fin, fout, config.rank, alpha)
        return slots


LORA = register(Lora())
