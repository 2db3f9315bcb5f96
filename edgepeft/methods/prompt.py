"""Prompt tuning (PEFT's ``PromptTuningConfig``): V trained embeddings before the user's tokens.

``inputs_embeds = [P; embed(ids)]``, the attention mask grows by V ones and positions count from the
first virtual token, as PEFT's prompt-learning forward does. The slot is what PEFT stores.
"""

from __future__ import annotations

from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import MethodConfig, ModelView
from edgepeft.methods.virtual import VirtualTokens
from edgepeft.names import PROMPT


class PromptTuning(VirtualTokens):
    name = "prompt"
    kinds = (PROMPT,)
    token_kind = PROMPT
    peft_type = "PROMPT_TUNING"
    virtual = "sequence"

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        return [self.slot(PROMPT, (self.tokens(view, config), view.hidden), init="normal")]

    def peft_prompt_config(self, manifest_config, t):
        return {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}


PROMPT_TUNING = register(PromptTuning())
