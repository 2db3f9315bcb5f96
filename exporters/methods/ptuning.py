"""P-tuning's forward pass: the MLP encoder's output (V, H) goes before the user's token embeddings."""

from __future__ import annotations

import torch.nn.functional as F

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import PT_B0, PT_B1, PT_B2, PT_EMBEDDING, PT_W0, PT_W1, PT_W2


class PTuningTorch(TorchMethod):
    name = "ptuning"

    def inputs(self, x, t, config):
        if PT_EMBEDDING not in t:
            return x
        h = F.relu(F.linear(t[PT_EMBEDDING], t[PT_W0], t[PT_B0]))  # (V, h)
        h = F.relu(F.linear(h, t[PT_W1], t[PT_B1]))
        return x.with_prompt(F.linear(h, t[PT_W2], t[PT_B2]))  # (V, H)


register_torch(PTuningTorch())
