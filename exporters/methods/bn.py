"""BatchNorm tuning's forward pass: the frozen norm replaced by ``x·a + b``, ``a = (γ + ds) / sqrt(running_var + eps)``,
``b = β + db - running_mean·a`` (the shift's delta db is BitFit's kind, folded into b: one full-size Add, not two).

That is ``bn(x) + ds·(x - running_mean) / sqrt(running_var + eps)``, written as one per-channel scale and shift of ``x``
instead of the frozen norm plus a correction: two full-size operations forward and three backward instead of five and
six. Per-channel arithmetic over a (N, C, 2, 2) map is a large part of the train step in onnxruntime
(benchmarks/bench_cnn_profile.py).

Where max pooling follows the norm (the KWS CNN's blocks), ``pooled_norm`` computes both at once so that the backward
pass works on the pooled map (exporters/pool_grad.AffineMaxPool).
"""

from __future__ import annotations

import torch
from torch import nn

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import BIAS, BN_SCALE


class BatchNormTorch(TorchMethod):
    name = "bn"
    absorbs = (BIAS,)  # the shift's delta (BitFit's kind) joins the frozen shift: one full-size Add, not two

    def replace(self, layer, x, t):
        if BN_SCALE not in t:
            return None
        a, shift = affine(layer.base, t)
        return x * a[:, None, None] + shift[:, None, None]


def affine(bn: nn.BatchNorm2d, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, shift) per channel, the tuned norm being ``x·a + shift``: a = (γ + ds) / sqrt(var + eps), shift = β + db - mean·a."""
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    a = (weight + t[BN_SCALE]) * torch.rsqrt(bn.running_var + bn.eps)
    shift = bias - bn.running_mean * a
    return a, (shift + t[BIAS] if BIAS in t else shift)


def pooled_norm(layer: nn.Module, x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor | None:
    """A tuned BatchNorm's output max-pooled over ``window`` (stride = window), its gradients taken on the pooled map
    (exporters/pool_grad.AffineMaxPool); None where ``layer`` is not a BatchNorm tuned in this traced step (the caller
    then runs the norm and the pooling as they are). A model's block calls this where a norm is followed by max pooling
    (exporters/kws_cnn.ConvBlock.norm_pool)."""
    from edgepeft.exporters.inject import DeltaLinear
    from edgepeft.exporters.pool_grad import AffineMaxPool, pools_exactly

    t = layer.replacing(BatchNormTorch.name) if isinstance(layer, DeltaLinear) else None
    if t is None or BN_SCALE not in t or not t[BN_SCALE].requires_grad or not pools_exactly(x, window):
        return None  # the inference graph (no gradients) keeps the plain form
    a, shift = affine(layer.base, t)
    return AffineMaxPool.apply(x, a, shift, window[0], window[1], x.requires_grad)


register_torch(BatchNormTorch())
