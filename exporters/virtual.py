"""A traced call's model inputs: the user's tokens, the virtual tokens and key/value prefixes, the KV cache.

Virtual-token methods (``Method.virtual``) change the model's input, not a module, the way PEFT's
prompt-learning forward does: a prompt goes before the token embeddings (``inputs_embeds``), a prefix
heads every layer's cache; either way the attention mask grows by V ones, and the model's own position
rule does the rest (positions count from the first virtual token, or start at V after a prefix). The
sequence grows inside the graph: the device feeds the user's tokens only, and ``skip`` tells the caller
how many leading output positions are virtual. A bundle without such methods calls the model exactly
as before (``input_ids``), so its graphs do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn

from edgepeft.exporters.inject import DeltaFeed


@dataclass(frozen=True)
class VirtualInputs:
    """One call's input as the virtual-token hooks see and extend it."""

    embeds: torch.Tensor  # (B, T, H) token embeddings, virtual tokens first
    mask: torch.Tensor  # (B, T) attention mask of ``embeds`` (the cache's positions are always attended)
    past: tuple[torch.Tensor, ...]  # the cache, flat [k0, v0, k1, v1, ...], each (B, kv heads, P, D); () for none
    kv: tuple[int, int, int]  # (layers, kv heads, head dim) of the model
    skip: Any = 0  # leading positions of ``embeds`` that are virtual (an int, or symbolic in model.onnx)

    def with_prompt(self, prompt: torch.Tensor) -> "VirtualInputs":
        """``prompt`` (V, H) before the tokens of every row."""
        b, v = self.embeds.shape[0], prompt.shape[0]
        rows = prompt.to(self.embeds.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, V, H)
        return replace(self, embeds=torch.cat([rows, self.embeds], 1),
                       mask=torch.cat([self.mask.new_ones(b, v), self.mask], 1), skip=self.skip + v)

    def with_prefix(self, prefix: torch.Tensor) -> "VirtualInputs":
        """``prefix`` (V, 2·L·K) in PEFT's layout at the head of every layer's cache."""
        layers, heads, d = self.kv
        kv = prefix.to(self.embeds.dtype).reshape(prefix.shape[0], 2 * layers, heads, d).permute(1, 2, 0, 3)  # (2L, heads, V, D)
        b = self.embeds.shape[0]
        # a call with a KV cache gets no prefix here: the runtime feeds it as that cache (exporters/causal_lm.infer_slots)
        return replace(self, past=tuple(kv[i].unsqueeze(0).expand(b, -1, -1, -1) for i in range(2 * layers)))


def model_inputs(model: nn.Module, feed: DeltaFeed, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 past: Sequence[torch.Tensor] = ()) -> tuple[dict[str, Any], Any]:
    """Keyword arguments of the HF model (or its base model) for one call, and how many leading output positions
    are virtual. ``past``: the call's KV cache, flat (causal LMs' model.onnx). Call it inside ``functional_call``, so
    the embedding lookup reads the traced frozen weights."""
    from transformers import DynamicCache

    from edgepeft.exporters.causal_lm import kv_shape

    hooks = [(h, {k: feed.tensors[n] for k, n in kinds.items() if n in feed.tensors}, c) for h, kinds, c in feed.virtual]
    hooks = [(h, t, c) for h, t, c in hooks if t]
    if not hooks and not past:
        return {"input_ids": input_ids, "attention_mask": attention_mask}, 0
    x = VirtualInputs(model.get_input_embeddings()(input_ids) if hooks else input_ids, attention_mask, tuple(past),
                      kv_shape(model.config))
    for hook, t, config in hooks:
        x = hook.inputs(x, t, config)
    out: dict[str, Any] = {"inputs_embeds" if hooks else "input_ids": x.embeds, "attention_mask": x.mask}
    if x.past:
        b, p = x.mask.shape[0], x.past[0].shape[2]
        out["attention_mask"] = torch.cat([x.mask.new_ones(b, p), x.mask], 1)
        out["past_key_values"] = DynamicCache([(x.past[2 * i], x.past[2 * i + 1]) for i in range(len(x.past) // 2)],
                                              config=model.config)
    return out, x.skip
