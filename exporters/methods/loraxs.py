"""The r×r core's forward pass, ``y + ((x Vᵀ) Rᵀ) Uᵀ``, and its frozen factors: a truncated SVD of each target weight."""

from __future__ import annotations

import torch

from edgepeft.exporters.methods import TorchMethod, register_torch, weight_of
from edgepeft.names import XS_R

U, VT = "xs_U", "xs_V"  # buffer names on each target: frozen.<module>.xs_U (out, r) = U_r S_r, .xs_V (r, in) = V_rᵀ


def truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_rᵀ) of ``w`` (out, in), computed in float64 and stored as float32."""
    u, s, vt = torch.linalg.svd(w.detach().double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float().contiguous(), vt[:rank].float().contiguous()


class LoraXSTorch(TorchMethod):
    name = "loraxs"

    def post(self, layer, x, y, t, scale):
        r = t.get(XS_R)
        return y if r is None else y + ((x @ getattr(layer, VT).t()) @ r.t()) @ getattr(layer, U).t()

    def frozen(self, slots, bases, config):
        out = {}
        for module, base in bases.items():
            us, vt = truncated_svd(weight_of(base), config.rank)  # the source weight, before any quantization
            out[module] = {U: us, VT: vt}
        return out


register_torch(LoraXSTorch())
