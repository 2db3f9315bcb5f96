"""exporters/conv_grad.py: the decomposed convolution backward equals torch's autograd, strides, padding and dilation included."""

from __future__ import annotations

import pytest
import torch

from edgepeft.exporters.conv_grad import convolution_backward


@pytest.mark.parametrize("kernel, stride, padding, dilation, size", [
    ((3, 3), 1, (1, 1), 1, (10, 13)), ((1, 1), 1, (0, 0), 1, (4, 4)), ((3, 3), 2, (1, 1), 1, (11, 9)),
    ((3, 3), 1, (2, 2), 2, (9, 9)), ((5, 5), 2, (0, 0), 1, (12, 15)), ((1, 3), 1, (0, 1), 1, (7, 8)),
    ((1, 1), 1, (0, 0), 1, (9, 21)), ((1, 1), 2, (0, 0), 1, (5, 7)),  # 1x1: per-image products; strided: im2col
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


@pytest.mark.parametrize("kernel, stride, padding, size", [
    ((3, 3), 1, (1, 1), (6, 7)), ((5, 5), 2, (2, 2), (11, 9)), ((3, 3), 2, (0, 0), (8, 10)), ((5, 5), 1, (2, 2), (2, 2)),
    ((3, 3), 2, (1, 1), (1, 1))])
def test_a_depthwise_input_gradient_as_a_forward_convolution_equals_torch(kernel, stride, padding, size):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, *size, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 1, *kernel, dtype=torch.float64, generator=g)
    y = torch.nn.functional.conv2d(x, w, None, stride, padding, 1, 6)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    (want,) = torch.autograd.grad(y, [x], gy)
    gx, _, _ = convolution_backward(gy, x.detach(), w, None, [stride] * 2, list(padding), [1, 1], False, [0, 0], 6,
                                    [True, False, False])
    torch.testing.assert_close(gx, want)


def test_a_depthwise_input_gradient_traces_to_one_forward_convolution():
    traced = torch.fx.experimental.proxy_tensor.make_fx(
        lambda gy, x, w: convolution_backward(gy, x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 6,
                                              [True, False, False])[0])(
        torch.randn(2, 6, 4, 4), torch.randn(2, 6, 8, 8), torch.randn(6, 1, 3, 3))
    convs = [n.args for n in traced.graph.nodes if n.target == torch.ops.aten.convolution.default]
    assert len(convs) == 1 and convs[0][6] is False  # one forward (not transposed) convolution


@pytest.mark.parametrize("size", [(2, 2), (4, 4), (3, 5)])
def test_a_pointwise_convolution_over_a_small_map_is_a_matrix_product_equal_to_torch(size):
    from edgepeft.exporters.conv_grad import convolution

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, *size, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 8, 1, 1, dtype=torch.float64, generator=g)
    b = torch.randn(5, dtype=torch.float64, generator=g)
    y = torch.nn.functional.conv2d(x, w, b)
    torch.testing.assert_close(convolution(x, w, b, [1, 1], [0, 0], [1, 1], False, [0, 0], 1), y)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    (want,) = torch.autograd.grad(y, [x], gy)
    gx, _, _ = convolution_backward(gy, x.detach(), w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                    [True, False, False])
    torch.testing.assert_close(gx, want)


def test_a_pointwise_convolution_over_a_large_map_stays_a_convolution():
    from edgepeft.exporters.conv_grad import MATMUL_MAX_PIXELS, convolution

    side = int(MATMUL_MAX_PIXELS ** 0.5) + 1
    assert convolution(torch.randn(1, 4, side, side), torch.randn(2, 4, 1, 1), None, [1, 1], [0, 0], [1, 1], False,
                       [0, 0], 1) is NotImplemented
