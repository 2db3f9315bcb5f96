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


def _assert_same(net: torch.nn.Module, rewritten: torch.nn.Module, x: torch.Tensor, atol: float = 0.0) -> None:
    """The rewritten module's output and every gradient (input and parameters) equal the original's, to ``atol``."""
    want_y, want = _grads(net, x)
    got_y, got = _grads(rewritten, x)
    for g, w in zip([got_y, *got], [want_y, *want]):
        torch.testing.assert_close(g, w, rtol=0, atol=atol)


def test_pooling_first_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    net = KwsCnn(5, mels=16, widths=(4, 8)).double().eval()
    _assert_same(net, pool_before_activation(copy.deepcopy(net)), torch.randn(3, 1, 16, 30, dtype=torch.float64))


def test_pooling_first_gives_the_same_gradients_where_windows_tie_or_are_not_positive():
    block = ConvBlock(1, 2, pool=True).double().eval()
    with torch.no_grad():  # the identity convolution: the block's input decides every window
        block.conv.weight.zero_()
        block.conv.weight[:, 0, 1, 1] = 1.0
    x = torch.tensor([[2.0, 2.0, -1.0, -1.0], [1.0, 2.0, -1.0, -3.0], [0.0, 0.0, 5.0, 1.0], [0.0, -2.0, 1.0, 5.0]],
                     dtype=torch.float64).reshape(1, 1, 4, 4)  # a positive tie, a negative window, a zero tie, a late tie
    _assert_same(block, pool_before_activation(copy.deepcopy(block)), x)
    assert block.pool_first is False and pool_before_activation(block).pool_first is True


def test_the_mean_over_time_as_a_product_gives_the_outputs_and_gradients_up_to_rounding():
    from edgepeft.exporters.kws_cnn import time_mean_as_product

    torch.manual_seed(1)
    net = KwsCnn(5, mels=16, widths=(4, 8)).double().eval()
    _assert_same(net, time_mean_as_product(copy.deepcopy(net)), torch.randn(3, 1, 16, 30, dtype=torch.float64), atol=1e-12)
    assert net.mean_as_product is False
