"""DoRA's forward pass, PEFT's order: ``y + (g − 1)·(x Wᵀ) + g·s·(x Aᵀ)Bᵀ`` with g = (‖W‖ + dm) / ‖W + s·B A‖ (detached).

``x Wᵀ`` is computed on its own (as PEFT does without dropout's shortcut), so additive methods that ran
before on the same layer (BitFit's bias) stay outside the magnitude scaling, like the base bias.
"""

from __future__ import annotations

import torch

from edgepeft.exporters.methods import TorchMethod, register_torch, weight_of
from edgepeft.names import DORA_A, DORA_B, DORA_M


class DoraTorch(TorchMethod):
    name = "dora"

    def post(self, layer, x, y, t, scale):
        a, b, dm = t.get(DORA_A), t.get(DORA_B), t.get(DORA_M)
        if a is None or b is None or dm is None:
            return y
        w = weight_of(layer.base).detach()  # (out, in); the frozen (dequantized) weight the graph reads
        norm = torch.linalg.norm(w + (b @ a).detach() * scale, dim=1).detach()  # PEFT detaches ‖W + ΔV‖
        g = (torch.linalg.norm(w, dim=1) + dm) / norm  # (out,)
        return y + (g - 1) * (x @ w.t()) + g * (((x @ a.t()) @ b.t()) * scale)


register_torch(DoraTorch())
