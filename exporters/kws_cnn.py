"""A small keyword-spotting CNN over log-mel features (1, mels, frames): four conv blocks and a linear classifier.

About 64k parameters and 12M multiply-adds per one-second clip (40 mels x 98 frames): the size of the
on-device keyword spotters of the "Hello Edge" study. Plain Conv2d, BatchNorm2d, ReLU and pooling, so
exporters/modules.py exports it like any image CNN; the blocks are one Sequential, the stack its
``top_layers`` counts. The last feature map is averaged over time, not over frequency: a keyword's pitch
and formants stay visible to the classifier, its position in the clip does not matter.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

WIDTHS = (16, 32, 64, 64)  # channels of the four blocks


class ConvBlock(nn.Module):
    """3x3 convolution, BatchNorm, ReLU, then 2x2 max pooling (``pool``) or none; ``pool_first``: the same
    outputs and gradients with the ReLU after the pooling (pool_before_activation)."""

    def __init__(self, c_in: int, c_out: int, pool: bool) -> None:
        super().__init__()
        self.pool_first = False
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        # the exporter's (exporters/methods/bn.pooled_norm): (norm layer, x, window) -> the norm's output pooled, or None
        self.norm_pool: Callable[[nn.Module, torch.Tensor, tuple[int, int]], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        if self.pool_first and self.norm_pool is not None and (k := _plain_window(self.pool)) is not None:
            if (pooled := self.norm_pool(self.bn, z, k)) is not None:
                return self.act(pooled)
        y = self.bn(z)
        return self.act(self.pool(y)) if self.pool_first else self.pool(self.act(y))


def _plain_window(pool: nn.Module) -> tuple[int, int] | None:
    """A MaxPool2d's window where its stride is the window and it has no padding, dilation or ceil mode, else None."""
    if not isinstance(pool, nn.MaxPool2d) or pool.padding not in (0, (0, 0)) or pool.dilation not in (1, (1, 1)) or pool.ceil_mode:
        return None
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    k = pair(pool.kernel_size)
    return k if pair(pool.stride or pool.kernel_size) == k else None


def pool_before_activation(module: nn.Module) -> nn.Module:
    """Every block pools before its ReLU (the exporter's form): the ReLU and its gradient then run over a quarter
    of the pixels. Exact, forward and backward: max and ReLU commute, and where a window's maximum is positive
    both orders send the gradient to its first maximum (the same elements); where it is not, both send none (the
    ReLU's gradient is zero at every element <= 0). On the KWS CNN's train step (batch 16, one thread) the
    full-size ReLU and its gradient were about a tenth of the kernel time; BN + head 19.1 -> 17.4 ms of CPU a step
    (benchmarks/results/speech_session.json)."""
    for m in module.modules():
        if isinstance(m, ConvBlock) and isinstance(m.act, nn.ReLU) and isinstance(m.pool, nn.MaxPool2d):
            m.pool_first = True
    return module


def time_mean_as_product(module: nn.Module) -> nn.Module:
    """The mean over time as a product with a constant column of 1/frames (the exporter's form): its gradient is then
    one product of the (B, C, rows, 1) gradient with a row, where the mean's was an Expand and a Div over the last
    block's whole map (onnxruntime's Expand broadcasts one element at a time: 0.17 ms of the KWS CNN's BN + head step,
    the product 0.02; the step 11.6 -> 11.4 ms of CPU in benchmarks/results/speech_session5.json). The same values up
    to rounding."""
    for m in module.modules():
        if isinstance(m, KwsCnn):
            m.mean_as_product = True
    return module


class KwsCnn(nn.Module):
    """(B, 1, mels, frames) log-mel features -> (B, words) logits."""

    def __init__(self, words: int, mels: int = 40, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        chans = (1, *widths)
        self.blocks = nn.Sequential(*(ConvBlock(chans[i], chans[i + 1], pool=i < len(widths) - 1) for i in range(len(widths))))
        self.flat = nn.Flatten()
        self.fc = nn.Linear(widths[-1] * (mels >> (len(widths) - 1)), words)  # channels x the last block's mel rows
        self.mean_as_product = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x)  # (B, C, rows, frames) -> mean over time -> (B, C * rows)
        if self.mean_as_product:  # the exporter's form (time_mean_as_product)
            return self.fc(self.flat((h @ torch.full((h.shape[-1], 1), 1.0 / h.shape[-1], dtype=h.dtype))[..., 0]))
        return self.fc(self.flat(h.mean(-1)))
