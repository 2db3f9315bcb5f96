"""VeRA's forward pass, ``y + b ⊙ ((d ⊙ (x A[:, :in]ᵀ)) B[:out]ᵀ)``, and its shared frozen projections.

The projections are drawn here with torch's generator exactly as PEFT draws them (``VeraModel
._init_vera_A_vera_B``: one CPU generator seeded with the key, A then B, kaiming-uniform with gain √2)
and stored in the bundle as frozen weights. Why not regenerate them on the device in numpy: numpy
cannot reproduce torch's generator, and only PEFT's exact matrices let a PEFT VeRA adapter of the
same seed load (and ours load in PEFT); stored, they cost r·(max in + max out) floats once per bundle.
"""

from __future__ import annotations

import math

import torch

from edgepeft.exporters.methods import TorchMethod, register_torch, weight_of
from edgepeft.names import VERA_B, VERA_D

SHARED_A, SHARED_B = "vera_A", "vera_B"  # buffer names (model root and every target); frozen.vera_A in the bundle


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: U(-b, b), b = √3·√2/√fan_in, drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraTorch(TorchMethod):
    name = "vera"

    def post(self, layer, x, y, t, scale):
        d, b = t.get(VERA_D), t.get(VERA_B)
        if d is None or b is None:
            return y
        fout, fin = weight_of(layer.base).shape
        a, bb = getattr(layer, SHARED_A)[:, :fin], getattr(layer, SHARED_B)[:fout, :]
        return y + b * ((d * (x @ a.t())) @ bb.t())

    def frozen(self, slots, bases, config):
        dims = [tuple(weight_of(m).shape)[::-1] for m in bases.values()]  # (in, out)
        g = torch.Generator(device="cpu").manual_seed(config.seed)
        a = kaiming_uniform((config.rank, max(i for i, _ in dims)), g)
        b = kaiming_uniform((max(o for _, o in dims), config.rank), g)
        shared = {SHARED_A: a, SHARED_B: b}
        return {"": shared, **{module: shared for module in bases}}  # one tensor each: stored once, as frozen.vera_A/B


register_torch(VeraTorch())
