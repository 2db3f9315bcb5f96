"""P-tuning (PEFT's ``PromptEncoderConfig``, the MLP encoder it defaults to): the prompt is an encoder's output.

``P = W2 relu(W1 relu(W0 E + b0) + b1) + b2`` with E (V, H) and the MLP trained and shipped; the
prompt then enters as in prompt tuning. PEFT's adapter file holds only P, so to-peft runs the encoder
in numpy and from-peft cannot recover the encoder (it says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepeft.errors import ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import MethodConfig, ModelView, option
from edgepeft.methods.virtual import VirtualConfig, VirtualTokens, relu
from edgepeft.names import PT_B0, PT_B1, PT_B2, PT_EMBEDDING, PT_W0, PT_W1, PT_W2


@dataclass(frozen=True)
class PTuningConfig(VirtualConfig):
    encoder_hidden_size: int | None = option(None, "Width h of the encoder MLP (PEFT's encoder_hidden_size). Default: the model's hidden size.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ExportError(f"--method-config ptuning.encoder_hidden_size: must be a positive integer, got {self.encoder_hidden_size}")


class PTuning(VirtualTokens):
    name = "ptuning"
    kinds = (PT_EMBEDDING, PT_W0, PT_B0, PT_W1, PT_B1, PT_W2, PT_B2)
    token_kind = PT_EMBEDDING
    matrices = (PT_W0, PT_W1, PT_W2)
    config_cls = PTuningConfig
    peft_type = "P_TUNING"
    virtual = "sequence"

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        assert isinstance(config, PTuningConfig)
        v, hid = self.tokens(view, config), view.hidden
        h = config.encoder_hidden_size or hid
        return [self.slot(PT_EMBEDDING, (v, hid), "normal"),
                self.slot(PT_W0, (h, hid), "kaiming_uniform"), self.slot(PT_B0, (h,)),
                self.slot(PT_W1, (h, h), "kaiming_uniform"), self.slot(PT_B1, (h,)),
                self.slot(PT_W2, (hid, h), "kaiming_uniform"), self.slot(PT_B2, (hid,))]

    def to_peft_prompt(self, t):
        e = t[PT_EMBEDDING].astype(np.float64)
        x = relu(e @ t[PT_W0].T + t[PT_B0])
        x = relu(x @ t[PT_W1].T + t[PT_B1])
        return (x @ t[PT_W2].T + t[PT_B2]).astype(np.float32)

    def peft_prompt_config(self, manifest_config, t):
        return {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": int(t[PT_W0].shape[0]),
                "encoder_num_layers": 2, "encoder_dropout": 0.0}


P_TUNING = register(PTuning())
