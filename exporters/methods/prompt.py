"""Prompt tuning's forward pass: the prompt (V, H) goes before the user's token embeddings."""

from __future__ import annotations

from edgepeft.exporters.methods import TorchMethod, register_torch
from edgepeft.names import PROMPT


class PromptTorch(TorchMethod):
    name = "prompt"

    def inputs(self, x, t, config):
        return x.with_prompt(t[PROMPT]) if PROMPT in t else x


register_torch(PromptTorch())
