"""The hub's weighted mean, taken in each method's own space, against the mean of the dense updates (numpy only).

methods3: VeRA (C = b dᵀ per module), the r x r core (R), bottleneck adapters (parameters, FedAvg).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgepeft.delta.format import Delta, DeltaMeta
from edgepeft.delta.merge import merge
from edgepeft.names import ADAPTER_DOWN, ADAPTER_DOWN_BIAS, ADAPTER_UP, ADAPTER_UP_BIAS, VERA_B, VERA_D, XS_R

MOD = "enc.0.q"
OUT, IN, R = 12, 10, 6
rng = np.random.default_rng(0)
A = rng.standard_normal((R, IN))  # VeRA's shared A, B; LoRA-XS's V_rᵀ, U_r S_r
B = rng.standard_normal((OUT, R))
WEIGHTS = [0.2, 0.5, 0.3]


def delta(tensors: dict[str, np.ndarray], method: str) -> Delta:
    t = {f"{MOD}.{k}": v.astype(np.float32) for k, v in tensors.items()}
    return Delta(t, DeltaMeta(base_fingerprint="f" * 64, method=method, samples=1))


def vera_dense(d: Delta) -> np.ndarray:
    b, dd = d.tensors[f"{MOD}.{VERA_B}"].astype(np.float64), d.tensors[f"{MOD}.{VERA_D}"].astype(np.float64)
    return (b[:, None] * B * dd[None, :]) @ A


def mean_dense(deltas: list[Delta], dense) -> np.ndarray:
    return sum(w * dense(d) for d, w in zip(deltas, WEIGHTS)) / sum(WEIGHTS)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_vera_merge_is_the_mean_dense_update_when_the_fleet_shares_d():
    d = rng.uniform(0.05, 0.2, R)
    deltas = [delta({VERA_D: d, VERA_B: rng.standard_normal(OUT)}, "vera") for _ in WEIGHTS]
    merged, _ = merge(deltas, WEIGHTS)
    assert rel(vera_dense(merged), mean_dense(deltas, vera_dense)) < 1e-6


def test_vera_merge_is_the_best_rank_one_fit_of_the_mean_in_bd_space():
    # ΔW = (B ⊙ b dᵀ) A is linear in C = b dᵀ: the mean of C is exact, its one-pair form is C's best rank-1 fit.
    deltas = [delta({VERA_D: rng.uniform(0.05, 0.2, R), VERA_B: rng.standard_normal(OUT)}, "vera") for _ in WEIGHTS]
    merged, _ = merge(deltas, WEIGHTS)
    c = sum(w * np.outer(d.tensors[f"{MOD}.{VERA_B}"], d.tensors[f"{MOD}.{VERA_D}"]) for d, w in zip(deltas, WEIGHTS))
    u, s, vt = np.linalg.svd(c / sum(WEIGHTS))
    fit = np.outer(merged.tensors[f"{MOD}.{VERA_B}"], merged.tensors[f"{MOD}.{VERA_D}"])
    assert rel(fit, s[0] * np.outer(u[:, 0], vt[0])) < 1e-6
    assert (merged.tensors[f"{MOD}.{VERA_D}"] > 0).all()  # the sign of the fleet's d is kept


def test_loraxs_merge_is_the_mean_dense_update():
    dense = lambda d: B @ d.tensors[f"{MOD}.{XS_R}"].astype(np.float64) @ A[:, :R].T  # noqa: E731  (U R Vᵀ, any U, V)
    deltas = [delta({XS_R: rng.standard_normal((R, R))}, "loraxs") for _ in WEIGHTS]
    merged, _ = merge(deltas, WEIGHTS)
    assert rel(dense(merged), mean_dense(deltas, dense)) < 1e-6


@pytest.mark.parametrize("kind", [ADAPTER_DOWN, ADAPTER_DOWN_BIAS, ADAPTER_UP, ADAPTER_UP_BIAS])
def test_bottleneck_merge_is_the_weighted_mean_of_each_parameter(kind):
    shapes = {ADAPTER_DOWN: (2, OUT), ADAPTER_DOWN_BIAS: (2,), ADAPTER_UP: (OUT, 2), ADAPTER_UP_BIAS: (OUT,)}
    deltas = [delta({k: rng.standard_normal(s) for k, s in shapes.items()}, "bottleneck") for _ in WEIGHTS]
    merged, _ = merge(deltas, WEIGHTS)
    want = sum(w * d.tensors[f"{MOD}.{kind}"].astype(np.float64) for d, w in zip(deltas, WEIGHTS)) / sum(WEIGHTS)
    assert rel(merged.tensors[f"{MOD}.{kind}"], want) < 1e-6
