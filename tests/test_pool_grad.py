"""exporters/pool_grad.py: max pooling and its gradient without indices equal torch's, ties and ragged edges included."""

from __future__ import annotations

import pytest
import torch

from edgepeft.exporters.pool_grad import max_pool2d_with_indices, max_pool2d_with_indices_backward


def _torch(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = torch.nn.functional.max_pool2d(x, k)
    g = torch.arange(y.numel(), dtype=x.dtype).reshape(y.shape)  # distinct values: a misplaced gradient shows
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("shape, k", [((2, 3, 8, 10), 2), ((2, 3, 9, 11), 2), ((1, 2, 10, 7), 3)])
def test_max_pool_and_its_gradient_equal_torch_on_ragged_sizes(shape, k):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    want_y, want_g = _torch(x, k)
    y, _ = max_pool2d_with_indices(x, [k, k])
    g = max_pool2d_with_indices_backward(torch.arange(y.numel(), dtype=x.dtype).reshape(y.shape), x, [k, k], [], [0, 0],
                                         [1, 1], False, None)
    assert torch.equal(y, want_y)
    assert torch.equal(g, want_g)


def test_ties_send_the_gradient_to_the_first_maximum_as_torch_does():
    x = torch.relu(torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1)))  # many zeros: windows of equal values
    x[:, :, 0:2, 0:2] = 1.5  # a positive tie too
    want_y, want_g = _torch(x, 2)
    y, _ = max_pool2d_with_indices(x, [2, 2])
    g = max_pool2d_with_indices_backward(torch.arange(y.numel(), dtype=x.dtype).reshape(y.shape), x, [2, 2], [2, 2], 0, 1,
                                         False, None)
    assert torch.equal(g, want_g)


def test_a_pooling_with_padding_or_another_stride_is_left_to_the_exporter():
    x = torch.randn(1, 1, 6, 6)
    assert max_pool2d_with_indices(x, [3, 3], [2, 2]) is NotImplemented
    assert max_pool2d_with_indices(x, [2, 2], [2, 2], [1, 1]) is NotImplemented
    assert max_pool2d_with_indices(x, [2, 2], [2, 2], 0, 1, True) is NotImplemented
