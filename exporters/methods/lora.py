"""LoRA's forward pass: ``y + s·(x Aᵀ)Bᵀ``; on a Conv2d, PEFT's lora.Conv2d: ``y + s·B(A(x))``.

On a convolution A is a conv with the layer's own kernel, stride and padding into r channels and B a
1x1 conv back out (PEFT's layout); the slots hold them flattened, A (r, in·kh·kw) and B (out, r), so
ΔW = s·B@A is the (out, in·kh·kw) update the hub averages, as for a linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import LORA_A, LORA_B


def conv_low_rank(base: nn.Conv2d, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B(A(x)) for a Conv2d base: A runs through the base's own forward (its padding, also a static 'same' one)."""
    w = base.weight
    a4 = a.reshape(a.shape[0], w.shape[1], w.shape[2], w.shape[3])
    swap = {"weight": a4}
    if base.bias is not None:
        swap["bias"] = torch.zeros(a.shape[0], dtype=a.dtype)
    h = functional_call(base, swap, (x,))  # (N, r, H', W')
    return F.conv2d(h, b[:, :, None, None])


class LoraTorch(TorchMethod):
    name = "lora"

    def post(self, layer, x, y, t, scale):
        a, b = t.get(LORA_A), t.get(LORA_B)
        if a is None or b is None:
            return y
        if isinstance(layer.base, nn.Conv2d):
            return y + conv_low_rank(layer.base, x, a, b * scale)  # scaling B, not the (N, out, H, W) map: half the full-size ops
        return y + ((x @ a.t()) @ b.t()) * scale  # (B, T, out)


register_torch(LoraTorch())
