"""BatchNorm tuning's forward pass: the frozen norm replaced by ``x·a + b``, ``a = (γ + ds) / sqrt(running_var + eps)``,
``b = β - running_mean·a`` (the shift's delta is BitFit's, added after).

That is ``bn(x) + ds·(x - running_mean) / sqrt(running_var + eps)``, written as one per-channel scale and shift of ``x``
instead of the frozen norm plus a correction: two full-size operations forward and three backward instead of five and
six. Per-channel arithmetic over a (N, C, 2, 2) map is a large part of the train step in onnxruntime
(benchmarks/bench_cnn_profile.py).
"""

from __future__ import annotations

import torch

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import BN_SCALE


class BatchNormTorch(TorchMethod):
    name = "bn"

    def replace(self, layer, x, t):
        if BN_SCALE not in t:
            return None
        bn = layer.base
        weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
        a = (weight + t[BN_SCALE]) * torch.rsqrt(bn.running_var + bn.eps)
        return x * a[:, None, None] + (bias - bn.running_mean * a)[:, None, None]


register_torch(BatchNormTorch())
