"""BitFit's forward pass: ``y + db``."""

from __future__ import annotations

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import BIAS


class BitFitTorch(TorchMethod):
    name = "bitfit"

    def post(self, layer, x, y, t, scale):
        return y + t[BIAS] if BIAS in t else y


register_torch(BitFitTorch())
