"""Prefix tuning's forward pass: the prefix (V, 2·L·K), projected first if the bundle trains a projection, heads every layer's cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import PREFIX, PX_B0, PX_B1, PX_EMBEDDING, PX_W0, PX_W1


class PrefixTorch(TorchMethod):
    name = "prefix"

    def inputs(self, x, t, config):
        if PREFIX in t:
            return x.with_prefix(t[PREFIX])
        if PX_EMBEDDING in t:
            return x.with_prefix(F.linear(torch.tanh(F.linear(t[PX_EMBEDDING], t[PX_W0], t[PX_B0])), t[PX_W1], t[PX_B1]))
        return x


register_torch(PrefixTorch())
