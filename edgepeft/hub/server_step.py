"""The hub's server optimizer: how far a version moves from its parent toward the mean of the devices' deltas.

FedAvgM (Hsu et al. 2019, "Measuring the effects of non-identical data distribution"): the round's pseudo-gradient
is Δₜ = mean − xₜ₋₁, a velocity vₜ = β·vₜ₋₁ + Δₜ, and the version xₜ = xₜ₋₁ + η·vₜ. Since η·vₜ₋₁ = xₜ₋₁ − xₜ₋₂ is
what the previous version moved, the same rule reads xₜ = xₜ₋₁ + η·Δₜ + β·(xₜ₋₁ − xₜ₋₂): the hub keeps no optimizer
state beyond its published versions, so a rebuilt or recovered version is the same. η = 1, β = 0 is plain FedAvg
(the version is the mean). Applied per part of each method's aggregation space (ΔW for LoRA) before re-factoring.
"""

from __future__ import annotations

import math

import numpy as np

from edgepeft.errors import HubError

Parts = dict[str, np.ndarray]


def check(lr: float, momentum: float) -> None:
    """Refuse a server step that diverges or means nothing: 0 < lr <= 10, 0 <= momentum < 1."""
    if not (math.isfinite(lr) and 0 < lr <= 10):
        raise HubError(f"server_lr must be in (0, 10], got {lr}; 1 takes the devices' mean as the version")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise HubError(f"server_momentum must be in [0, 1), got {momentum}; 0 turns it off, 0.9 is FedAvgM's usual value")


def is_plain(lr: float, momentum: float) -> bool:
    """True when the step is FedAvg's (the version is the mean), so callers skip it."""
    return lr == 1.0 and momentum == 0.0


def server_step(mean: Parts, parent: Parts | None, grandparent: Parts | None, lr: float, momentum: float) -> Parts:
    """xₜ = xₜ₋₁ + lr·(mean − xₜ₋₁) + momentum·(xₜ₋₁ − xₜ₋₂), per space part.

    No parent (the first version): the mean itself, since devices started from the bundle's initial slots, which the
    hub never sees. No grandparent: no velocity yet (vₜ₋₁ = 0).
    """
    if parent is None:
        return mean
    out: Parts = {}
    for k, m in mean.items():
        x = parent[k].astype(np.float64)
        step = lr * (m - x)
        if grandparent is not None and momentum:
            step += momentum * (x - grandparent[k])
        out[k] = x + step
    return out
