"""The head's forward pass: ``y + x dWᵀ`` (its bias delta is BitFit's kind)."""

from __future__ import annotations

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import WEIGHT


class HeadTorch(TorchMethod):
    name = "head"

    def post(self, layer, x, y, t, scale):
        return y + x @ t[WEIGHT].t() if WEIGHT in t else y


register_torch(HeadTorch())
