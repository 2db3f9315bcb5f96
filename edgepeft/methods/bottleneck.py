"""Bottleneck adapters: ``y = base(x) + up(act(down(y₀)))`` on a sublayer's output projection, before the residual.

Placement ``houlsby`` puts one after the attention output and one after the feed-forward output,
``pfeiffer`` only after the feed-forward output. down: (m, d) and (m,), up: (d, m) and (d,) with
m = d // reduction_factor; up starts at zero, so a fresh adapter is the base model (neutral: zeros).

Non-linear in its parameters: two adapters mixed in one call, or one at a weight other than 1, have
no exact meaning and are refused. The hub takes the weighted mean of the parameters (FedAvg): exact
for the up projection given a shared down projection, and to first order near a shared start (a
fleet that trains from the same published version); there is no space where the mean is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepeft.errors import DeltaError, ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import Method, MethodConfig, ModelView, Tensors, option, select
from edgepeft.names import ADAPTER_DOWN, ADAPTER_DOWN_BIAS, ADAPTER_UP, ADAPTER_UP_BIAS, slot_name

PLACEMENTS = ("houlsby", "pfeiffer")
NON_LINEARITIES = ("relu", "gelu", "tanh", "silu")  # each maps 0 to 0 (exporters/methods/bottleneck.py)


@dataclass(frozen=True)
class BottleneckConfig(MethodConfig):
    placement: str = option("pfeiffer", "houlsby: after the attention output and the feed-forward output; pfeiffer: after the feed-forward output only.")
    reduction_factor: int = option(16, "Bottleneck width m = d // reduction_factor for an output of width d.")
    non_linearity: str = option("relu", f"Activation between down and up projection: {', '.join(NON_LINEARITIES)}.")
    targets: tuple[str, ...] | None = option(None, "Module patterns whose outputs get an adapter (PEFT rules). Default: the placement's modules of the family.")

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ExportError(f"--method-config bottleneck.placement: {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.reduction_factor <= 0:
            raise ExportError(f"--method-config bottleneck.reduction_factor: must be a positive integer, got {self.reduction_factor}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ExportError(f"--method-config bottleneck.non_linearity: {self.non_linearity!r}; choose one of {', '.join(NON_LINEARITIES)}")


class Bottleneck(Method):
    name = "bottleneck"
    kinds = (ADAPTER_DOWN, ADAPTER_DOWN_BIAS, ADAPTER_UP, ADAPTER_UP_BIAS)
    config_cls = BottleneckConfig
    mixable = False

    def ndim(self, kind: str) -> int:
        return 2 if kind in (ADAPTER_DOWN, ADAPTER_UP) else 1

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        assert isinstance(config, BottleneckConfig)
        patterns = config.targets or view.default(f"bottleneck.{config.placement}")
        slots = []
        for name in select(view, patterns, self.name, "targets"):
            _, d = view.linears[name]
            m = d // config.reduction_factor
            if m < 1:
                raise ExportError(f"--method-config bottleneck.reduction_factor: {config.reduction_factor} leaves no width "
                                  f"on {name} (output {d}); choose at most {d}")
            slots += [Slot(slot_name(name, ADAPTER_DOWN), ADAPTER_DOWN, name, (m, d), init="kaiming_uniform"),
                      Slot(slot_name(name, ADAPTER_DOWN_BIAS), ADAPTER_DOWN_BIAS, name, (m,)),
                      Slot(slot_name(name, ADAPTER_UP), ADAPTER_UP, name, (d, m)),
                      Slot(slot_name(name, ADAPTER_UP_BIAS), ADAPTER_UP_BIAS, name, (d,))]
        return slots

    def check_module(self, module: str, tensors: Tensors, meta_rank: int, where: str) -> None:
        missing = [k for k in self.kinds if k not in tensors]
        if missing:
            raise DeltaError(f"{where}: bottleneck adapter on {module!r} lacks {', '.join(missing)}")

    def mix(self, slot: Slot, parts: list[np.ndarray], weights: list[float], scales: list[float]) -> np.ndarray:
        if len(parts) != 1 or weights != [1.0]:
            raise DeltaError(f"bottleneck deltas cannot be mixed or weighted in one call ({slot.module}): a non-linear "
                             "adapter's mix has no exact meaning; use one adapter at weight 1, or merge them first")
        return parts[0]


BOTTLENECK = register(Bottleneck())
