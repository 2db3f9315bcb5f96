"""BatchNorm tuning's forward pass: ``y + ds·(x - running_mean) / sqrt(running_var + eps)`` (its shift is BitFit's)."""

from __future__ import annotations

import torch

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import BN_SCALE


class BatchNormTorch(TorchMethod):
    name = "bn"

    def post(self, layer, x, y, t, scale):
        if BN_SCALE not in t:
            return y
        bn = layer.base
        inv = torch.rsqrt(bn.running_var + bn.eps)
        return y + (t[BN_SCALE] * inv)[:, None, None] * (x - bn.running_mean[:, None, None])


register_torch(BatchNormTorch())
