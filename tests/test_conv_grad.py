"""exporters/conv_grad.py: the decomposed convolution backward equals torch's autograd, strides, padding and dilation included."""

from __future__ import annotations

import pytest
import torch

from edgepeft.exporters.conv_grad import convolution_backward


@pytest.mark.parametrize("kernel, stride, padding, dilation, size", [
    ((3, 3), 1, (1, 1), 1, (10, 13)), ((1, 1), 1, (0, 0), 1, (4, 4)), ((3, 3), 2, (1, 1), 1, (11, 9)),
    ((3, 3), 1, (2, 2), 2, (9, 9)), ((5, 5), 2, (0, 0), 1, (12, 15)), ((1, 3), 1, (0, 1), 1, (7, 8)),
    ((16, 1), 4, (7, 0), 1, (40, 1))])  # past IM2COL_MAX_TAPS: the convolution form (torchcrepe's long kernels)
def test_input_and_weight_gradients_equal_torch(kernel, stride, padding, dilation, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, *size, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, *kernel, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.nn.functional.conv2d(x, w, None, stride, padding, dilation)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    want_x, want_w = torch.autograd.grad(y, [x, w], gy)
    gx, gw, gb = convolution_backward(gy, x.detach(), w.detach(), None, [stride] * 2, list(padding), [dilation] * 2, False,
                                      [0, 0], 1, [True, True, True])
    torch.testing.assert_close(gx, want_x)
    torch.testing.assert_close(gw, want_w)
    torch.testing.assert_close(gb, gy.sum((0, 2, 3)))
