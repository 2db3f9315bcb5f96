"""A tiny CNN with the layer kinds of a mobile network (full, depthwise and 1x1 convolutions, BatchNorm,
ReLU6, pooling, a Linear head), seeded, with BatchNorm running statistics that are not the identity."""

from __future__ import annotations

import torch
from torch import nn

LABELS = ("a", "b", "c")
SIZE = (3, 12, 12)  # (C, H, W) of the example input


class Block(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1), each with BatchNorm."""

    def __init__(self, c: int, e: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, e, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(e)
        self.dw = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False)
        self.bn1 = nn.BatchNorm2d(e)
        self.project = nn.Conv2d(e, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn0(self.expand(x)))
        h = self.act(self.bn1(self.dw(h)))
        return x + self.bn2(self.project(h))


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.blocks = nn.Sequential(Block(8, 16), Block(8, 16), Block(8, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.blocks(self.act(self.bn(self.stem(x)))))))


def tiny_cnn(seed: int = 0) -> TinyCNN:
    """A seeded TinyCNN in eval mode with random BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    return randomize_batchnorm(TinyCNN(), seed + 1, affine=True).eval()


def randomize_batchnorm(m: nn.Module, seed: int, *, affine: bool) -> nn.Module:
    """Seeded BatchNorm statistics (and, with ``affine``, scales and shifts) that are not the identity, in place."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if affine:
                mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return m


def export_tiny(out, quantize: str = "none", method: str = "lora+bn", seed: int = 0, labels: tuple[str, ...] = LABELS):
    """The tiny CNN exported with every convolution method: LoRA r=2 on its full and 1x1 convolutions (the
    depthwise ones refused, so targeted by name), BN tuning and the head, every layer trained."""
    from edgepeft.exporters.modules import export_bundle

    targets = ("stem", "expand", "project")
    return export_bundle(tiny_cnn(seed), torch.zeros(1, *SIZE), out, labels=labels, head="fc", method=method,
                         method_config={"lora.rank": 2, "lora.targets": ",".join(targets)} if "lora" in method else {},
                         quantize=quantize, mean=(0.5,), std=(0.25,))
