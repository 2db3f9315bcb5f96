"""AdaLoRA's forward pass, PEFT's ``SVDLinear``: ``y + s·(x (P·λ)ᵀ) Qᵀ``, and its orthogonality regularization."""

from __future__ import annotations

import torch

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import ADA_A, ADA_B, ADA_E, split_slot_name


class AdaLoraTorch(TorchMethod):
    name = "adalora"

    def post(self, layer, x, y, t, scale):
        p, e, q = t.get(ADA_A), t.get(ADA_E), t.get(ADA_B)
        if p is None or e is None or q is None:
            return y
        return y + ((x @ (p * e[:, None]).t()) @ q.t()) * scale  # (B, T, out)

    def regularizer(self, tensors, config):
        # PEFT's AdaLoraModel.forward: orth_reg_weight * mean over every P and Q of ‖PPᵀ - I‖_F / ‖QᵀQ - I‖_F
        if not config.orth_reg_weight:
            return None
        terms = []
        for name, t in sorted(tensors.items()):
            kind = split_slot_name(name)[1]
            if kind in (ADA_A, ADA_B):
                cov = t @ t.t() if kind == ADA_A else t.t() @ t  # (r, r)
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype)))
        return config.orth_reg_weight * torch.stack(terms).mean() if terms else None


register_torch(AdaLoraTorch())
