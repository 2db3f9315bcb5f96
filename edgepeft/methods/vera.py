"""VeRA (PEFT's ``VeraConfig``): ``y = base(x) + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ)``, trainable vectors d (r,) and b (out,) only.

A (r, max in) and B (max out, r) are frozen, random and shared by every target (a target of width
(out, in) uses A[:, :in] and B[:out]). Export draws them as PEFT does from ``vera.seed`` (PEFT's
``projection_prng_key``) and stores them once in the bundle's weights, so the base fingerprint binds
them and the device regenerates nothing (see exporters/methods/vera.py for why not numpy).

Neutral: b = 0. One delta at weight w is exact (w·b); a mix of several has no (d, b) in general and
is refused. The hub averages C = b dᵀ per module, in which ΔW = (B ⊙ C) A is linear, so the mean is
exact there; it is brought back to one (b, d) pair by the best rank-1 fit of C (exact when the
devices share d, or b, up to scale), d keeping the norm of the inputs' mean d.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepeft.errors import DeltaError, ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import Method, MethodConfig, ModelView, Tensors, option, select
from edgepeft.names import VERA_B, VERA_D, slot_name


@dataclass(frozen=True)
class VeraConfig(MethodConfig):
    rank: int = option(256, "VeRA rank r: rows of the shared random A (PEFT's r). It may exceed a target's width, as in the paper.")
    seed: int = option(0, "Seed of the shared random projections (PEFT's projection_prng_key); recorded in the manifest.")
    d_initial: float = option(0.1, "Start value of every entry of d (PEFT's d_initial); b starts at zero.")
    targets: tuple[str, ...] | None = option(None, "Module patterns (PEFT rules). Default: the family's LoRA targets.")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ExportError(f"--method-config vera.rank: rank must be a positive integer, got {self.rank}")
        if not 0 <= self.seed < 2**63:
            raise ExportError(f"--method-config vera.seed: must be in [0, 2**63), got {self.seed}")


class Vera(Method):
    name = "vera"
    kinds = (VERA_D, VERA_B)
    config_cls = VeraConfig
    mixable = False
    exact_mean = False  # exact only when the fleet shares d (tests/test_method_spaces.py)
    peft_type = "VERA"
    peft_keys = {VERA_D: "vera_lambda_d", VERA_B: "vera_lambda_b"}
    peft_shared = ("vera_A", "vera_B")  # save_projection=True: the adapter file carries the bundle's own A and B

    def peft_config(self, modules, options):
        return {"r": int(options.get("rank", VeraConfig.rank)), "projection_prng_key": int(options.get("seed", VeraConfig.seed)),
                "save_projection": True, "d_initial": float(options.get("d_initial", VeraConfig.d_initial)),
                "vera_dropout": 0.0, "bias": "none", "init_weights": True}

    def check_peft_config(self, cfg, options, where):
        want = {"r": int(options.get("rank", VeraConfig.rank)), "projection_prng_key": int(options.get("seed", VeraConfig.seed))}
        bad = [f"{k} is {cfg.get(k)!r}, the bundle's is {v}" for k, v in want.items() if cfg.get(k) != v]
        if bad:
            raise DeltaError(f"{where}: {'; '.join(bad)}: the adapter's shared projections are not the bundle's "
                             "(export the bundle with --method-config vera.rank=R vera.seed=KEY to match)")

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        assert isinstance(config, VeraConfig)
        slots = []
        for name in select(view, config.targets or view.default("lora.targets"), self.name, "targets"):
            _, fout = view.linears[name]
            slots += [Slot(slot_name(name, VERA_D), VERA_D, name, (config.rank,), init=repr(float(config.d_initial))),
                      Slot(slot_name(name, VERA_B), VERA_B, name, (fout,))]
        return slots

    def init(self, slot: Slot, rng: np.random.Generator) -> np.ndarray:
        if slot.kind == VERA_D:  # the manifest records d_initial as the slot's init
            return np.full(slot.shape, float(slot.init), np.float32)
        return super().init(slot, rng)

    def mix(self, slot: Slot, parts: list[np.ndarray], weights: list[float], scales: list[float]) -> np.ndarray:
        if len(parts) != 1:
            raise DeltaError(f"vera deltas cannot be mixed in one call ({slot.module}): b·B·d·A of two deltas is no "
                             "single (d, b); use one adapter, or merge them into one delta first")
        return parts[0] * np.float32(weights[0]) if slot.kind == VERA_B and weights[0] != 1.0 else parts[0]

    def check_module(self, module: str, tensors: Tensors, meta_rank: int, where: str) -> None:
        if (VERA_D in tensors) != (VERA_B in tensors):
            have, other = (VERA_D, VERA_B) if VERA_D in tensors else (VERA_B, VERA_D)
            raise DeltaError(f"{where}: tensor {slot_name(module, have)!r} has no partner {slot_name(module, other)!r}")

    def to_space(self, module: str, tensors: Tensors, scale: float, base: np.ndarray | None = None) -> dict[str, np.ndarray]:
        d, b = tensors[VERA_D].astype(np.float64), tensors[VERA_B].astype(np.float64)
        return {f"{module}:bd": np.outer(b, d), f"{module}:d": d}  # d alone: the mean's sign, norm, and d where b = 0

    def from_space(self, module: str, space: dict[str, np.ndarray], rank: int, scale: float,
                   base: np.ndarray | None = None) -> tuple[Tensors, float]:
        c, mean_d = space[f"{module}:bd"], space[f"{module}:d"]
        total = float(np.linalg.norm(c))
        if total == 0:
            return {VERA_D: mean_d.astype(np.float32), VERA_B: np.zeros(c.shape[0], np.float32)}, 0.0
        _, _, vt = np.linalg.svd(c, full_matrices=False)
        v = vt[0] if vt[0] @ mean_d >= 0 else -vt[0]  # the sign of the inputs' d
        d = v * (float(np.linalg.norm(mean_d)) or 1.0)
        b = c @ d / (d @ d)  # the least-squares b for this d
        err = float(np.linalg.norm(c - np.outer(b, d))) / total
        return {VERA_D: d.astype(np.float32), VERA_B: b.astype(np.float32)}, err

    def lerp(self, module: str, parent: Tensors | None, delta: Tensors, lam: float, scales: tuple[float, float],
             base: np.ndarray | None = None) -> Tensors:
        # parent + λ(delta − parent) in C = b dᵀ space, brought back by the same rank-1 fit as the hub's mean.
        new = self.to_space(module, delta, 1.0)
        old = self.to_space(module, parent, 1.0) if parent is not None else {
            f"{module}:bd": np.zeros_like(new[f"{module}:bd"]), f"{module}:d": new[f"{module}:d"]}
        out, _ = self.from_space(module, {k: old[k] + lam * (new[k] - old[k]) for k in new}, 0, 1.0)
        return out


VERA = register(Vera())
