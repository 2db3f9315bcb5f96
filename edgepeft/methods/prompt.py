"""Prompt tuning (PEFT's ``PromptTuningConfig``): V trained embeddings before the user's tokens.

``inputs_embeds = [P; embed(ids)]``, the attention mask grows by V ones and positions count from the
first virtual token, as PEFT's prompt-learning forward does. The slot is what PEFT stores. It starts
N(0, 1) (PEFT's RANDOM) or, with ``init=text``, as the base model's embeddings of ``init_text``'s
tokens repeated to V (PEFT's TEXT); the device computes that start from its bundle's tokenizer and
embedding table (runtime/prompt_init.py), so the text init needs nothing beyond the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgepeft.errors import ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import MethodConfig, ModelView, option
from edgepeft.methods.virtual import VirtualConfig, VirtualTokens
from edgepeft.names import PROMPT

TEXT_INIT = "text"  # Slot.init of a prompt that starts from init_text's embeddings


@dataclass(frozen=True)
class PromptConfig(VirtualConfig):
    init: str = option("random", "random: N(0, 1) (PEFT's RANDOM); text: the base model's embeddings of init_text's "
                                 "tokens, repeated to num_virtual_tokens (PEFT's TEXT).")
    init_text: str | None = option(None, "The text whose token embeddings start the prompt (with init=text).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in ("random", TEXT_INIT):
            raise ExportError(f"--method-config prompt.init={self.init}: choose random or text")
        if (self.init == TEXT_INIT) != bool(self.init_text):
            raise ExportError("--method-config prompt.init_text: give it exactly when prompt.init=text "
                              "(e.g. --method-config init=text --method-config 'init_text=Is this review positive?')")


class PromptTuning(VirtualTokens):
    name = "prompt"
    kinds = (PROMPT,)
    token_kind = PROMPT
    peft_type = "PROMPT_TUNING"
    virtual = "sequence"
    config_cls = PromptConfig

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        assert isinstance(config, PromptConfig)
        return [self.slot(PROMPT, (self.tokens(view, config), view.hidden), init=TEXT_INIT if config.init == TEXT_INIT else "normal")]

    def peft_prompt_config(self, manifest_config, t):
        # The adapter holds the trained prompt: how it started does not matter to PEFT when it loads it.
        return {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}


PROMPT_TUNING = register(PromptTuning())
