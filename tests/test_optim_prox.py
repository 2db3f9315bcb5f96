"""SGD's momentum, AdamW's epsilon and the proximal pull (FedProx) equal torch's, fed the same gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepeft.errors import TrainError
from edgepeft.runtime.optim import SGD, AdamW
from edgepeft.runtime.trainer import TrainConfig
from test_optim import SHAPES, assert_close, gradients, start


def torch_params(values: dict[str, np.ndarray]) -> dict[str, torch.nn.Parameter]:
    return {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in values.items()}


def numpy_steps(opt, grads, lr: float) -> None:
    for g in grads:
        opt.step({k: v.copy() for k, v in g.items()}, lr)


def test_sgd_momentum_with_weight_decay_matches_torch_step_for_step():
    grads = gradients(25)
    ours = start()
    numpy_steps(SGD(ours, weight_decay=0.1, momentum=0.9), grads, 0.05)
    theirs = torch_params(start())
    ref = torch.optim.SGD(theirs.values(), lr=0.05, momentum=0.9, weight_decay=0.1)
    for g in grads:
        for k, p in theirs.items():
            p.grad = torch.from_numpy(g[k].copy())
        ref.step()
    assert_close(ours, {k: p.detach().numpy() for k, p in theirs.items()})


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_prox_is_torch_sgd_on_the_loss_plus_fedprox_term(momentum):
    """SGD's prox is FedProx's term in the loss: torch differentiates <g, w> + mu/2 ||w - w0||^2 itself."""
    grads, mu = gradients(25), 0.5
    ours = start()
    numpy_steps(SGD(ours, momentum=momentum, prox=mu), grads, 0.05)
    theirs, anchor = torch_params(start()), {k: torch.from_numpy(v) for k, v in start().items()}
    ref = torch.optim.SGD(theirs.values(), lr=0.05, momentum=momentum)
    for g in grads:
        ref.zero_grad()
        loss = sum((torch.from_numpy(g[k]) * p).sum() + mu / 2 * ((p - anchor[k]) ** 2).sum() for k, p in theirs.items())
        loss.backward()
        ref.step()
    assert_close(ours, {k: p.detach().numpy() for k, p in theirs.items()})
    plain = start()
    numpy_steps(SGD(plain, momentum=momentum), grads, 0.05)  # the pull is big enough to tell apart
    assert max(float(np.abs(ours[k] - plain[k]).max()) for k in SHAPES) > 1e-2


def test_adamw_prox_is_torch_adamw_decaying_the_distance_from_the_start():
    """Decoupled: AdamW's weight decay of w - w0 (torch AdamW with weight_decay = mu on the shifted variable)."""
    grads, mu = gradients(25), 2.0
    ours = start(seed=5)
    numpy_steps(AdamW(ours, weight_decay=0.0, prox=mu), grads, 1e-2)
    # prox anchors at the values the optimizer is built with: start(seed=5), here shifted to the origin for torch
    w0 = start(seed=5)
    shifted = torch_params({k: np.zeros_like(v) for k, v in w0.items()})
    ref = torch.optim.AdamW(shifted.values(), lr=1e-2, weight_decay=mu)
    for g in grads:
        for k, p in shifted.items():
            p.grad = torch.from_numpy(g[k].copy())
        ref.step()
    assert_close(ours, {k: p.detach().numpy() + w0[k] for k, p in shifted.items()})


def test_adamw_with_a_large_epsilon_matches_torch():
    grads = gradients(10, scale=1e-3)  # gradients the size of a fleet device's: eps 1e-3 makes the steps gradient-sized
    ours = start()
    numpy_steps(AdamW(ours, eps=1e-3, weight_decay=0.0), grads, 1e-2)
    theirs = torch_params(start())
    ref = torch.optim.AdamW(theirs.values(), lr=1e-2, eps=1e-3, weight_decay=0.0)
    for g in grads:
        for k, p in theirs.items():
            p.grad = torch.from_numpy(g[k].copy())
        ref.step()
    assert_close(ours, {k: p.detach().numpy() for k, p in theirs.items()})


def test_sgd_momentum_resumes_from_its_state_exactly():
    grads = gradients(10)
    whole = start()
    numpy_steps(SGD(whole, momentum=0.9, prox=0.1), grads, 0.05)
    first = start()
    opt = SGD(first, momentum=0.9, prox=0.1)
    numpy_steps(opt, grads[:4], 0.05)
    arrays, scalars = opt.state()
    # a resumed run builds its optimizer from the starting delta (the prox anchor), then loads the moments and params
    resumed = start()
    again = SGD(resumed, momentum=0.9, prox=0.1)
    again.load_state(arrays, scalars)
    for k in resumed:
        resumed[k][...] = first[k]
    numpy_steps(again, grads[4:], 0.05)
    assert_close(resumed, whole)


@pytest.mark.parametrize(("options", "message"), [
    ({"momentum": 0.9}, "--momentum is SGD's"),
    ({"optimizer": "sgd", "adam_eps": 1e-4}, "--adam-eps is AdamW's"),
    ({"prox": -1.0}, "prox must be a non-negative number"),
    ({"optimizer": "sgd", "momentum": 1.0}, "momentum must lie in"),
])
def test_an_option_the_optimizer_does_not_take_is_refused_by_the_config(options, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(**options)


def test_sgd_without_momentum_refuses_a_checkpoint_with_momentum_buffers():
    opt = SGD(start(), momentum=0.9)
    numpy_steps(opt, gradients(2), 0.05)
    arrays, scalars = opt.state()
    with pytest.raises(TrainError, match="momentum buffers"):
        SGD(start()).load_state(arrays, scalars)
