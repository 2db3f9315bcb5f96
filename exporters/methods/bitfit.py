"""BitFit's forward pass: ``y + db`` (on a convolution or BatchNorm output (N, C, H, W): per channel)."""

from __future__ import annotations

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import BIAS


def per_channel(v, y):
    """``v`` (C,) shaped to broadcast over ``y``'s channel axis: 1 for (N, C, H, W), the last one otherwise."""
    return v[:, None, None] if y.dim() == 4 else v


class BitFitTorch(TorchMethod):
    name = "bitfit"

    def post(self, layer, x, y, t, scale):
        return y + per_channel(t[BIAS], y) if BIAS in t else y


register_torch(BitFitTorch())
