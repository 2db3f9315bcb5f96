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


def merged(base: nn.Module, a: torch.Tensor) -> bool:
    """Whether LoRA on ``base`` runs as one convolution with the weight W + s·B@A: for a convolution whose low-rank
    branch costs at least the frozen convolution's multiply-adds per pixel, r·(C·kh·kw + out) >= out·C·kh·kw (the KWS
    CNN's first one: 1 channel in, 16 out, r = 8). Its weight is then no constant (none of onnxruntime's fast NCHWc
    kernels), but one convolution and one weight gradient replace the frozen one plus A's and B's forward, input
    gradient and weight gradient convolutions and a full-size add: the KWS CNN's LoRA + head step, 26.2 -> 22.5 ms of
    CPU (batch 16, one thread; benchmarks/results/speech_session.json)."""
    if not isinstance(base, nn.Conv2d) or base.groups != 1:
        return False
    out, fan_in = base.weight.shape[0], base.weight[0].numel()
    return a.shape[0] * (fan_in + out) >= out * fan_in


class LoraTorch(TorchMethod):
    name = "lora"

    def replace(self, layer, x, t):
        a, b = t.get(LORA_A), t.get(LORA_B)
        if a is None or b is None or not merged(layer.base, a):
            return None
        w = layer.base.weight
        scale = layer.feed.scale.get(layer.path, 1.0)  # as post's
        return functional_call(layer.base, {"weight": w + ((b * scale) @ a).reshape(w.shape)}, (x,))

    def post(self, layer, x, y, t, scale):
        a, b = t.get(LORA_A), t.get(LORA_B)
        if a is None or b is None or merged(layer.base, a):
            return y
        if isinstance(layer.base, nn.Conv2d):
            return y + conv_low_rank(layer.base, x, a, b * scale)  # scaling B, not the (N, out, H, W) map: half the full-size ops
        return y + ((x @ a.t()) @ b.t()) * scale  # (B, T, out)


register_torch(LoraTorch())
