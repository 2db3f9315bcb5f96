"""The hub's server step (FedAvgM): a version moves server_lr of the way to the devices' mean, plus momentum times what
its parent moved; exact on toy deltas through the hub's own aggregation, and recorded in the version's report."""

from __future__ import annotations

import numpy as np
import pytest

from edgepeft.errors import HubError
from edgepeft.hub import aggregate as agg
from edgepeft.hub.robust import RobustOptions
from edgepeft.hub.server_step import server_step
from test_hub_aggregate import MODULES, PLAIN, env, published, random_delta, upload  # noqa: F401  (env: a fixture)

LR, MOMENTUM = 0.5, 0.9


def fedavgm_velocity_form(means: list[np.ndarray], x0: np.ndarray, lr: float, momentum: float) -> list[np.ndarray]:
    """Hsu et al.'s FedAvgM as written there, with its velocity state: v = β·v + (mean − x); x = x + η·v."""
    x, v, out = x0, np.zeros_like(x0), []
    for m in means:
        v = momentum * v + (m - x)
        x = x + lr * v
        out.append(x)
    return out


def test_the_stateless_rule_is_fedavgm_with_its_velocity():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4))
    means = [rng.standard_normal((3, 4)) for _ in range(5)]
    want = fedavgm_velocity_form(means, x0, LR, MOMENTUM)
    xs = [x0]  # the published versions; the first step has no velocity, as v starts at 0
    for m in means:
        parts = server_step({"p": m}, {"p": xs[-1]}, {"p": xs[-2]} if len(xs) > 1 else None, LR, MOMENTUM)
        xs.append(parts["p"])
    for got, expect in zip(xs[1:], want):
        np.testing.assert_allclose(got, expect, rtol=1e-12)


def test_the_first_version_is_the_mean_whatever_the_step():
    mean = {"p": np.arange(4.0)}
    assert server_step(mean, None, None, LR, MOMENTUM) is mean


def test_plain_options_leave_the_version_at_the_mean():
    x1, x2, m = ({"p": np.full(2, v)} for v in (1.0, 0.0, 3.0))
    np.testing.assert_array_equal(server_step(m, x1, x2, 1.0, 0.0)["p"], m["p"])


def test_a_versions_lora_dw_bias_and_head_take_the_server_step_exactly(env):
    store, manifest = env
    options = {**PLAIN, "server_lr": LR, "server_momentum": MOMENTUM}
    versions, means = [], []
    for rnd in range(3):  # shared A: every mean and version has rank 4, so re-factoring is exact
        deltas = [random_delta(manifest, 10 * rnd + i, samples=i + 1, shared_a=True, device=f"d{i}",
                               parent=versions[-1].meta.version if versions else None) for i in range(3)]
        for d in deltas:
            upload(store, d)
        w = np.array([d.meta.samples for d in deltas], float) / sum(d.meta.samples for d in deltas)
        means.append({m: sum(wi * d.delta_w(m) for wi, d in zip(w, deltas)) for m in MODULES}
                     | {n: sum(wi * d.tensors[n].astype(np.float64) for wi, d in zip(w, deltas)) for n in ("enc.0.q.bias", "head.weight")})
        v = agg.aggregate(store, "f", "default", options=options)
        assert v.report["options"]["server_lr"] == LR and v.report["options"]["server_momentum"] == MOMENTUM
        versions.append(published(store, manifest, v.version))

    def parts(d):
        return {m: d.delta_w(m) for m in MODULES} | {n: d.tensors[n] for n in ("enc.0.q.bias", "head.weight")}

    x1, x2, x3 = (parts(v) for v in versions)
    for k in x3:
        np.testing.assert_allclose(x1[k], means[0][k], rtol=1e-5, atol=1e-6)  # v1: the mean (no parent)
        np.testing.assert_allclose(x2[k], x1[k] + LR * (means[1][k] - x1[k]), rtol=1e-5, atol=1e-6)  # no velocity yet
        np.testing.assert_allclose(x3[k], x2[k] + LR * (means[2][k] - x2[k]) + MOMENTUM * (x2[k] - x1[k]), rtol=1e-5, atol=1e-6)


def test_the_trimmed_mean_takes_the_same_server_step(env):
    store, manifest = env
    robust = {"clip_median": None, "trim": 0.2, "max_samples": 10**6}
    first = [random_delta(manifest, i, samples=1, shared_a=True, device=f"d{i}") for i in range(5)]
    for d in first:
        upload(store, d)
    x1 = published(store, manifest, agg.aggregate(store, "f", options=robust).version)
    second = [random_delta(manifest, 50 + i, samples=1, shared_a=True, device=f"d{i}", parent=1) for i in range(5)]
    for d in second:
        upload(store, d)
    x2 = published(store, manifest, agg.aggregate(store, "f", options={**robust, "server_lr": LR}).version)
    stack = np.stack([d.tensors["head.weight"].astype(np.float64) for d in second])
    trimmed = np.sort(stack, axis=0)[1:4].mean(axis=0)  # 5 deltas, 20 %: one cut at each end per coordinate
    want = x1.tensors["head.weight"] + LR * (trimmed - x1.tensors["head.weight"])
    np.testing.assert_allclose(x2.tensors["head.weight"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [{"server_lr": 0.0}, {"server_lr": float("nan")}, {"server_momentum": 1.0},
                                 {"server_momentum": -0.1}])
def test_a_server_step_that_diverges_or_means_nothing_is_refused(bad):
    with pytest.raises(HubError, match="server_"):
        RobustOptions.from_dict(bad)
