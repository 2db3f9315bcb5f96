"""The bottleneck adapter's forward pass: ``y + up(act(down(y)))`` on the wrapped module's output."""

from __future__ import annotations

import torch.nn.functional as F

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import ADAPTER_DOWN, ADAPTER_DOWN_BIAS, ADAPTER_UP, ADAPTER_UP_BIAS

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": F.tanh, "silu": F.silu}  # methods.bottleneck.NON_LINEARITIES


class BottleneckTorch(TorchMethod):
    name = "bottleneck"

    def post(self, layer, x, y, t, scale):
        if ADAPTER_DOWN not in t:
            return y
        act = ACTIVATIONS[layer.configs[self.name].non_linearity]
        h = act(y @ t[ADAPTER_DOWN].t() + t[ADAPTER_DOWN_BIAS])
        return y + h @ t[ADAPTER_UP].t() + t[ADAPTER_UP_BIAS]


register_torch(BottleneckTorch())
