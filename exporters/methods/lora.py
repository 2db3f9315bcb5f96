"""LoRA's forward pass: ``y + s·(x Aᵀ)Bᵀ``."""

from __future__ import annotations

import torch

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import LORA_A, LORA_B


class LoraTorch(TorchMethod):
    name = "lora"

    def post(self, layer, x, y, t, scale):
        a, b = t.get(LORA_A), t.get(LORA_B)
        if a is None or b is None:
            return y
        return y + ((x @ a.t()) @ b.t()) * scale  # (B, T, out)


register_torch(LoraTorch())
