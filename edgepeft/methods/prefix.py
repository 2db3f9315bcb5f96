"""Prefix tuning (PEFT's ``PrefixTuningConfig``): V trained keys and values at the head of every layer's cache.

The prefix (V, 2·L·K), K = key/value heads x head dim, is PEFT's layout: per virtual token, layer 0's
keys, layer 0's values, layer 1's keys ... The attention mask grows by V ones and the user's positions
start at V, as with a cache of V tokens. With ``projection`` (PEFT's prefix_projection) the prefix is
``W1 tanh(W0 E + b0) + b1`` and E, W0, b0, W1, b1 train and ship; PEFT's adapter file holds the prefix
itself, so to-peft runs the projection in numpy and from-peft reads only bundles without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepeft.errors import ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import MethodConfig, ModelView, option
from edgepeft.methods.virtual import VirtualConfig, VirtualTokens
from edgepeft.names import PREFIX, PX_B0, PX_B1, PX_EMBEDDING, PX_W0, PX_W1


@dataclass(frozen=True)
class PrefixConfig(VirtualConfig):
    projection: bool = option(False, "Reparameterize the prefix by a two-layer tanh MLP (PEFT's prefix_projection).")
    encoder_hidden_size: int | None = option(None, "Width h of the projection MLP (PEFT's encoder_hidden_size). Default: the model's hidden size.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ExportError(f"--method-config prefix.encoder_hidden_size: must be a positive integer, got {self.encoder_hidden_size}")


class PrefixTuning(VirtualTokens):
    name = "prefix"
    kinds = (PREFIX, PX_EMBEDDING, PX_W0, PX_B0, PX_W1, PX_B1)
    matrices = (PX_EMBEDDING, PX_W0, PX_W1)
    token_kind = PREFIX  # without projection; with it the token slot is PX_EMBEDDING (token_slot_kind)
    config_cls = PrefixConfig
    peft_type = "PREFIX_TUNING"
    virtual = "prefix"

    def infer_axis(self, kind: str) -> int | None:
        return 0 if kind in (PREFIX, PX_EMBEDDING) else None

    def neutral(self, slot: Slot) -> np.ndarray:
        if slot.kind in (PREFIX, PX_EMBEDDING):
            return np.zeros((0, slot.shape[1]), np.float32)
        return np.zeros(slot.shape, np.float32)

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        assert isinstance(config, PrefixConfig)
        v, k = self.tokens(view, config), view.kv_heads * view.head_dim
        width = 2 * view.layers * k
        if not config.projection:
            return [self.slot(PREFIX, (v, width), "normal")]
        h = config.encoder_hidden_size or view.hidden
        return [self.slot(PX_EMBEDDING, (v, k), "normal"), self.slot(PX_W0, (h, k), "kaiming_uniform"),
                self.slot(PX_B0, (h,)), self.slot(PX_W1, (width, h), "kaiming_uniform"), self.slot(PX_B1, (width,))]

    def to_peft_prompt(self, t):
        if PREFIX in t:
            return t[PREFIX]
        x = np.tanh(t[PX_EMBEDDING].astype(np.float64) @ t[PX_W0].T + t[PX_B0])
        return (x @ t[PX_W1].T + t[PX_B1]).astype(np.float32)

    def peft_prompt_config(self, manifest_config, t):
        # The adapter holds the prefix itself: PEFT loads it without the projection (inference_mode).
        return {"prefix_projection": False, "encoder_hidden_size": int(t[PX_W0].shape[0]) if PX_W0 in t else None}


PREFIX_TUNING = register(PrefixTuning())
