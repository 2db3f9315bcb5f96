"""A memory budget on a CNN bundle: onnxruntime's shared arena, capped by the budget, instead of arena off."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgepeft.runtime import memory
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.image_data import load_image_dataset
from edgepeft.runtime.trainer import TrainConfig, Trainer
from test_vision_train import colour_images


@pytest.fixture(scope="module")
def images(cnn_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("arena-images")
    for name, n, seed in (("train", 64, 0), ("val", 32, 1)):
        x, y = colour_images(n, seed)
        np.save(d / f"{name}.npy", x)
        np.save(d / f"{name}.labels.npy", y)
    bundle = open_bundle(cnn_bundle("int8"))
    return bundle, *(load_image_dataset(d / f"{n}.npy", bundle.manifest) for n in ("train", "val"))


def _fit(bundle, train, val, budget: float) -> Trainer:
    t = Trainer(bundle, train, TrainConfig(max_steps=3, batch_size=16, lr=1e-2, memory_budget_mb=budget), val=val)
    t.result = t.fit()
    return t


@pytest.mark.parametrize("budget", [120, 1000])  # tight, and room for onnxruntime's own arena: capped either way
def test_memory_plan_caps_a_shared_arena_at_what_the_budget_leaves_when_inputs_have_one_shape(budget):
    p = memory.plan_memory(budget, batch_size=64, longest=1, measure=lambda b, t: 100.0 + 1.0 * b, sized_arena=True)
    assert p.session.arena and p.session.arena_cap_mb == pytest.approx(budget * memory.HEADROOM - 100.0, abs=0.1)
    assert p.estimate_mb <= budget and f"arena capped at {p.session.arena_cap_mb:.0f} MB" in p.describe()


def test_memory_plan_keeps_arena_off_for_text_whose_shapes_vary():
    p = memory.plan_memory(120, batch_size=64, longest=1, measure=lambda b, t: 100.0 + 1.0 * b)
    assert not p.session.arena and not p.session.arena_cap_mb


def test_a_budget_trains_a_cnn_in_the_capped_shared_arena_and_learns_the_same_delta(images):
    bundle, train, val = images
    free = _fit(bundle, train, val, 0)
    tight = _fit(bundle, train, val, memory.rss_mb() + 500)
    cap = tight.result.summary.memory.session.arena_cap_mb
    assert cap > 0
    for sess in (tight.session, tight.predictor.session):  # evaluation shares the train step's arena
        assert sess.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
    for k, v in free.result.delta.tensors.items():
        np.testing.assert_allclose(tight.result.delta.tensors[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


def test_a_cap_onnxruntime_cannot_train_under_falls_back_to_arena_off(images, monkeypatch):
    bundle, train, val = images
    plan = memory.plan_memory
    monkeypatch.setattr(memory, "plan_memory", lambda *a, **kw: dataclasses.replace(
        p := plan(*a, **kw), session=dataclasses.replace(p.session, arena=True, arena_cap_mb=0.01)))
    t = _fit(bundle, train, val, memory.rss_mb() + 500)
    s = t.result.summary
    assert not s.memory.session.arena and not s.memory.session.arena_cap_mb and s.steps == 3
    assert "arena off" in s.memory.describe()
