"""AdaLoRA's rank budget on the device (numpy): PEFT's ``RankAllocator`` and ``AdaLoraModel.update_and_allocate``.

After every optimizer step the trainer hands over the updated slots and the step's gradients. Each triplet i of a
module scores ``S(λᵢ) + mean_j S(Pᵢⱼ) + mean_j S(Qⱼᵢ)`` with ``S = Ī·Ū``: Ī the EMA (beta1) of the sensitivity
``|w·g|`` and Ū the EMA (beta2) of its uncertainty ``|I - Ī|``. The budget (triplets kept over all modules) falls
from init_r per module to target_r per module on PEFT's cubic schedule between tinit and total - tfinal; every
deltaT steps the lowest-scoring triplets past the budget get λ = 0 (PEFT masks in place; the shapes never change,
so one export serves every budget). The last allocation is final: its pattern is re-applied after every later step
and decides which triplets the delta keeps.
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np

from edgepeft.errors import TrainError
from edgepeft.manifest import Slot
from edgepeft.methods.adalora import AdaLoraConfig
from edgepeft.names import ADA_A, ADA_B, ADA_E, slot_name


def check_schedule(config: AdaLoraConfig, total: int) -> None:
    """Refuse a schedule that leaves no budgeting phase in a run of ``total`` steps (PEFT's own condition)."""
    if config.tinit >= total - config.tfinal:
        raise TrainError(f"AdaLoRA schedule: tinit {config.tinit} + tfinal {config.tfinal} leave no steps to prune ranks in "
                         f"this run's {total} steps; train longer (--epochs / --max-steps) or export with smaller "
                         "--method-config adalora.tinit / adalora.tfinal")


class RankBudget:
    """The allocator of one run: importance EMAs per slot, the current rank pattern, the masking of λ."""

    def __init__(self, config: AdaLoraConfig, slots: list[Slot], total: int) -> None:
        check_schedule(config, total)
        self.config, self.total = config, total
        self.modules = sorted({s.module for s in slots if s.kind == ADA_E})
        self.slots = sorted(s.name for s in slots if s.kind in (ADA_A, ADA_E, ADA_B))
        self.init_budget = config.init_r * len(self.modules)
        self.target_budget = config.target_r * len(self.modules)
        self.avg_ipt: dict[str, np.ndarray] = {}
        self.avg_unc: dict[str, np.ndarray] = {}
        self.pattern: dict[str, np.ndarray] | None = None  # module -> kept triplets (bool, init_r)

    def schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to allocate) at ``step``: PEFT's ``budget_schedule``."""
        c, final = self.config, self.total - self.config.tfinal
        if step <= c.tinit:
            return self.init_budget, False
        if step > final:
            return self.target_budget, True
        coeff = 1 - (step - c.tinit) / (final - c.tinit)
        return int((self.init_budget - self.target_budget) * coeff ** 3 + self.target_budget), step % c.deltaT == 0

    def after_step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray], step: int) -> None:
        """PEFT's ``update_and_allocate(step)``: ``params`` already updated by this step, ``grads`` its gradients."""
        final = self.total - self.config.tfinal
        if step < final:
            self._update_importance(params, grads)
            budget, allocate = self.schedule(step)
            if not allocate:
                return
            self.pattern = self._allocate(budget)
        elif step == final:  # the final allocation, at the target budget; the EMAs are done
            self.pattern = self._allocate(self.schedule(step)[0])
            self.avg_ipt, self.avg_unc = {}, {}
        if self.pattern is not None:  # after the final allocation: its pattern again after every step
            self.apply(params)

    def apply(self, params: dict[str, np.ndarray]) -> None:
        """Zero λ of every pruned triplet (in place)."""
        for m, keep in (self.pattern or {}).items():
            params[slot_name(m, ADA_E)][~keep] = 0.0

    def _update_importance(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        b1, b2 = np.float32(self.config.beta1), np.float32(self.config.beta2)
        for n in self.slots:
            ipt = np.abs(params[n] * grads[n])
            avg = self.avg_ipt.get(n, np.zeros_like(ipt))
            avg = b1 * avg + (1 - b1) * ipt
            self.avg_unc[n] = b2 * self.avg_unc.get(n, np.zeros_like(ipt)) + (1 - b2) * np.abs(ipt - avg)
            self.avg_ipt[n] = avg

    def scores(self) -> dict[str, np.ndarray]:
        """Per module, the score of each triplet (PEFT's ``_combine_ipt`` of the element scores)."""
        s = {n: self.avg_ipt[n] * self.avg_unc[n] for n in self.avg_ipt}
        return {m: s[slot_name(m, ADA_E)] + s[slot_name(m, ADA_A)].mean(1) + s[slot_name(m, ADA_B)].mean(0)
                for m in self.modules}

    def _allocate(self, budget: int) -> dict[str, np.ndarray]:
        """Keep the ``budget`` best triplets over all modules: PEFT's ``mask_to_budget`` (ties at the threshold go)."""
        scores = self.scores()
        k = self.init_budget - budget
        threshold = np.sort(np.concatenate([scores[m] for m in self.modules]))[k - 1]  # torch.kthvalue(k)
        return {m: ~(scores[m] <= threshold) for m in self.modules}

    def finish(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The delta that travels: only the surviving triplets of each module (all of them if nothing was pruned)."""
        if self.pattern is None:
            return tensors
        out = dict(tensors)
        for m, keep in self.pattern.items():
            out[slot_name(m, ADA_A)] = np.ascontiguousarray(tensors[slot_name(m, ADA_A)][keep])
            out[slot_name(m, ADA_E)] = np.ascontiguousarray(tensors[slot_name(m, ADA_E)][keep])
            out[slot_name(m, ADA_B)] = np.ascontiguousarray(tensors[slot_name(m, ADA_B)][:, keep])
        return out

    def describe(self) -> dict[str, str]:
        """Delta metadata: the kept ranks per module, as JSON."""
        ranks = {m: int(k.sum()) for m, k in (self.pattern or {}).items()}
        return {"adalora_ranks": json.dumps(ranks, sort_keys=True)} if ranks else {}

    # ---- checkpoint ------------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        out = {f"ipt.{n}": v for n, v in self.avg_ipt.items()} | {f"unc.{n}": v for n, v in self.avg_unc.items()}
        return out | {f"keep.{m}": k.astype(np.float32) for m, k in (self.pattern or {}).items()}

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.avg_ipt = {k[4:]: np.array(v) for k, v in arrays.items() if k.startswith("ipt.")}
        self.avg_unc = {k[4:]: np.array(v) for k, v in arrays.items() if k.startswith("unc.")}
        keep = {k[5:]: np.array(v) > 0.5 for k, v in arrays.items() if k.startswith("keep.")}
        self.pattern = keep or None
