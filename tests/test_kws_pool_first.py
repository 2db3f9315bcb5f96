"""exporters/kws_cnn.pool_before_activation: pooling before the ReLU gives the KWS CNN's outputs and gradients exactly."""

from __future__ import annotations

import copy

import torch

from edgepeft.exporters.kws_cnn import ConvBlock, KwsCnn, pool_before_activation


def _grads(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = net(x)
    params = [p for p in net.parameters()]
    return y, torch.autograd.grad((y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).cos()).sum(), [x, *params])


def test_pooling_first_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    net = KwsCnn(5, mels=16, widths=(4, 8)).double().eval()
    x = torch.randn(3, 1, 16, 30, dtype=torch.float64)
    want_y, want = _grads(net, x)
    got_y, got = _grads(pool_before_activation(copy.deepcopy(net)), x)
    assert torch.equal(got_y, want_y)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_pooling_first_gives_the_same_gradients_where_windows_tie_or_are_not_positive():
    block = ConvBlock(1, 2, pool=True).double().eval()
    with torch.no_grad():  # the identity convolution: the block's input decides every window
        block.conv.weight.zero_()
        block.conv.weight[:, 0, 1, 1] = 1.0
    x = torch.tensor([[2.0, 2.0, -1.0, -1.0], [1.0, 2.0, -1.0, -3.0], [0.0, 0.0, 5.0, 1.0], [0.0, -2.0, 1.0, 5.0]],
                     dtype=torch.float64).reshape(1, 1, 4, 4)  # a positive tie, a negative window, a zero tie, a late tie
    want_y, want = _grads(block, x)
    got_y, got = _grads(pool_before_activation(copy.deepcopy(block)), x)
    assert torch.equal(got_y, want_y)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert block.pool_first is False and pool_before_activation(block).pool_first is True


def test_the_mean_over_time_as_a_product_gives_the_outputs_and_gradients_up_to_rounding():
    from edgepeft.exporters.kws_cnn import time_mean_as_product

    torch.manual_seed(1)
    net = KwsCnn(5, mels=16, widths=(4, 8)).double().eval()
    x = torch.randn(3, 1, 16, 30, dtype=torch.float64)
    want_y, want = _grads(net, x)
    got_y, got = _grads(time_mean_as_product(copy.deepcopy(net)), x)
    assert torch.allclose(got_y, want_y, rtol=0, atol=1e-12)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=0, atol=1e-12)
    assert net.mean_as_product is False
