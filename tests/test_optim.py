"""The numpy optimizer equals torch's: AdamW, the LR schedules and clipping, fed the same gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from edgepeft.errors import TrainError
from edgepeft.runtime.optim import SGD, AdamW, clip_by_global_norm, lr_at

SHAPES = {"a.lora_A": (4, 6), "a.lora_B": (6, 4), "a.bias": (6,)}


def gradients(steps: int, seed: int = 0, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()} for _ in range(steps)]


def start(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def torch_run(grads, lr_fn, *, weight_decay: float, max_norm: float | None):
    """torch.optim.AdamW + a scheduler (from lr_fn(optimizer)) + clip_grad_norm_, as a training loop uses them."""
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in start().items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=weight_decay)
    sched = lr_fn(opt)
    for g in grads:
        for k, p in params.items():
            p.grad = torch.from_numpy(g[k].copy())
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
        opt.step()
        sched.step()
    return {k: p.detach().numpy() for k, p in params.items()}


def numpy_run(grads, *, schedule: str, warmup: int, weight_decay: float, max_norm: float | None):
    params = start()
    opt = AdamW(params, weight_decay=weight_decay)
    for step, g in enumerate(grads):
        g = {k: v.copy() for k, v in g.items()}
        if max_norm is not None:
            clip_by_global_norm(g, max_norm)
        opt.step(g, lr_at(step, base_lr=1e-2, total=len(grads), warmup=warmup, schedule=schedule))
    return params


def assert_close(ours, theirs):
    for k in SHAPES:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_adamw_with_weight_decay_matches_torch_step_for_step():
    grads = gradients(25)
    ours = numpy_run(grads, schedule="constant", warmup=0, weight_decay=0.1, max_norm=None)
    theirs = torch_run(grads, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0), weight_decay=0.1, max_norm=None)
    assert_close(ours, theirs)


def test_sgd_with_weight_decay_matches_torch_step_for_step():
    grads = gradients(25)
    ours = start()
    opt = SGD(ours, weight_decay=0.1)
    for g in grads:
        opt.step(g, 0.05)
    theirs = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in start().items()}
    ref = torch.optim.SGD(theirs.values(), lr=0.05, weight_decay=0.1)
    for g in grads:
        for k, p in theirs.items():
            p.grad = torch.from_numpy(g[k].copy())
        ref.step()
    assert_close(ours, {k: p.detach().numpy() for k, p in theirs.items()})


def test_adamw_survives_an_exactly_zero_gradient_like_torch():
    grads = gradients(3)
    grads[1] = {k: np.zeros_like(v) for k, v in grads[1].items()}  # eps keeps the update finite
    ours = numpy_run(grads, schedule="constant", warmup=0, weight_decay=0.0, max_norm=None)
    theirs = torch_run(grads, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0), weight_decay=0.0, max_norm=None)
    assert_close(ours, theirs)


def test_linear_decay_equals_torch_linear_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=40)
    for step in range(45):
        assert lr_at(step, base_lr=0.3, total=40, warmup=0, schedule="linear") == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()


def test_cosine_decay_equals_torch_cosine_annealing_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40, eta_min=0.0)
    for step in range(41):
        assert lr_at(step, base_lr=0.3, total=40, warmup=0, schedule="cosine") == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        sched.step()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_warmup_schedules_equal_the_transformers_lambda_lr_schedules(schedule):
    make = {"linear": transformers.get_linear_schedule_with_warmup, "cosine": transformers.get_cosine_schedule_with_warmup}[schedule]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = make(opt, num_warmup_steps=7, num_training_steps=50)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    for step in range(50):
        assert lr_at(step, base_lr=0.3, total=50, warmup=7, schedule=schedule) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping and not clipping
def test_clip_by_global_norm_equals_torch_clip_grad_norm(max_norm):
    g = gradients(1, scale=3.0)[0]
    tensors = [torch.from_numpy(v.copy()) for v in g.values()]
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
    for p, t in zip(params, tensors):
        p.grad = t
    norm_torch = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norm_ours = clip_by_global_norm(g, max_norm)
    assert norm_ours == pytest.approx(norm_torch, rel=1e-6)
    for p, k in zip(params, g):
        np.testing.assert_allclose(g[k], p.grad.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_adamw_schedule_and_clipping_together_match_torch(schedule):
    make = {"linear": transformers.get_linear_schedule_with_warmup, "cosine": transformers.get_cosine_schedule_with_warmup}[schedule]
    grads = gradients(30, seed=4, scale=2.0)
    ours = numpy_run(grads, schedule=schedule, warmup=5, weight_decay=0.01, max_norm=1.0)
    theirs = torch_run(grads, lambda o: make(o, num_warmup_steps=5, num_training_steps=30), weight_decay=0.01, max_norm=1.0)
    assert_close(ours, theirs)


def test_non_finite_gradient_norm_is_a_train_error():
    g = gradients(1)[0]
    g["a.bias"][0] = np.nan
    with pytest.raises(TrainError, match="lower --lr"):
        clip_by_global_norm(g, 1.0)
