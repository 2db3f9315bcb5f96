"""exporters/methods/lora: LoRA on a convolution whose low-rank branch costs at least the convolution itself runs as
one convolution with the merged weight W + s·B@A, with the same output and gradients as the frozen convolution plus
PEFT's branch s·B(A(x)); other convolutions keep the branch."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from edgepeft.exporters.methods.lora import LoraTorch, conv_low_rank, merged
from edgepeft.names import LORA_A, LORA_B


def test_only_a_convolution_no_wider_than_its_low_rank_branch_is_merged():
    assert merged(nn.Conv2d(1, 16, 3), torch.zeros(8, 9))  # the KWS CNN's first: 8 * (9 + 16) >= 16 * 9
    assert not merged(nn.Conv2d(16, 32, 3), torch.zeros(8, 144))
    assert not merged(nn.Conv2d(8, 8, 3, groups=8), torch.zeros(8, 9))
    assert not merged(nn.Linear(4, 4), torch.zeros(8, 4))


def test_the_merged_convolution_equals_the_frozen_one_plus_the_branch_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(1, 16, 3, padding=1, bias=True).double()
    layer = SimpleNamespace(base=conv, feed=SimpleNamespace(scale={"c": 0.5}), path="c")
    x = torch.randn(2, 1, 7, 9, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(8, 9, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(16, 8, dtype=torch.float64, generator=g, requires_grad=True)
    method, t = LoraTorch(), {LORA_A: a, LORA_B: b}
    y = method.post(layer, x, method.replace(layer, x, t), t, 0.5)
    want = conv(x) + conv_low_rank(conv, x, a, b) * 0.5
    torch.testing.assert_close(y, want)
    gy = torch.randn(want.shape, dtype=torch.float64, generator=g)
    for got, ref in zip(torch.autograd.grad(y, [x, a, b], gy), torch.autograd.grad(want, [x, a, b], gy)):
        torch.testing.assert_close(got, ref)
