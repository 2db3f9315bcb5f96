"""IA3's forward pass: ``base(x * l_ff)`` on a feed-forward input, ``base(x) * l`` on an output (PEFT's order)."""

from __future__ import annotations

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import IA3_FF, IA3_L


class IA3Torch(TorchMethod):
    name = "ia3"

    def pre(self, layer, x, t):
        return x * t[IA3_FF] if IA3_FF in t else x

    def post(self, layer, x, y, t, scale):
        return y * t[IA3_L] if IA3_L in t else y


register_torch(IA3Torch())
