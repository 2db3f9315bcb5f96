"""Causal-LM graphs: a next-token loss that never holds all the logits, and model.onnx with a KV cache.

Memory. Scoring every position against the whole vocabulary is what made causal-LM training costly:
at batch 8 x 256 tokens and SmolLM2's 49,152-token vocabulary one fp32 logits tensor is 400 MB, and
autograd keeps several of that size (logits, log-softmax, their gradients). The train graph here

- scores only the positions that carry a label (``target_index``: the runtime leaves out padding and,
  for instruction data, the prompt), and
- computes loss and gradient with respect to the hidden states in the forward pass, one vocabulary
  block of the head at a time (``HEAD_BLOCKS``, an online softmax over the blocks: one (N, V/J) block
  of logits and one fp32 (V/J, H) block of a quantized head alive at a time), saving only the (N, H)
  gradient for the backward pass: the "fused linear cross-entropy" of Liger / Apple's cut-cross-entropy.

The loss is written by hand (the exporter's ``nll_loss`` gives gradients N times too large), and the
head weight is frozen, so its gradient is never formed.

KV cache. model.onnx takes every layer's past keys and values (B, heads, P, D) and returns them
extended by this call's T tokens; P = 0 is a call without a cache. Past positions are always
attended: the runtime generates one sequence at a time, so a cache never holds padding.
"""

from __future__ import annotations

from typing import Callable

import onnx
import torch
from torch import nn
from torch.export import Dim
from torch.func import functional_call

from edgepeft.manifest import Graph, Slot
from edgepeft.methods import owner, virtual_tokens
from edgepeft.names import (ATTENTION_MASK, INFER_GRAPH_FILE, INPUT_IDS, LOGITS, LOSS, TARGET_IDS,
                            TARGET_INDEX, TRAIN_GRAPH_FILE, grad_name, past_name, present_name)
from edgepeft.exporters.inject import DeltaFeed
from edgepeft.exporters.recompute import recompute_layers
from edgepeft.exporters.virtual import model_inputs

LOSS_CHUNKS = 16  # the runtime hands the scored positions as (K, M) chunks; the loss reads all K*M at once
HEAD_BLOCKS = 16  # the loss reads the head in 16 vocabulary blocks: 1/16 of the (N, V) logits and of the head at a time
KV = ("key", "value")
RECOMPUTE = True  # trained layers keep only their input for the backward: SmolLM2 peaks at 0.33x torch + PEFT (results/llm.json)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy of ``hidden @ weight.T (+ bias)``; the gradient w.r.t. ``hidden`` is computed in
    the forward pass, one vocabulary block of the head at a time, so neither the (N, V) logits nor a whole fp32 copy
    of a quantized head is ever alive."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        # hidden (K, M, H), weight (V, H), targets (K, M) with -1 where nothing is scored: all K*M positions at once
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
        t = targets.reshape(-1)
        valid = (t >= 0).to(h.dtype)  # (N,)
        t = t.clamp(min=0)
        rows = weight.index_select(0, t)  # (N, H) the targets' head rows: read as int8 rows (exporters/weights.py)
        picked = (h * rows).sum(-1)  # (N,) the target logits
        if bias is not None:
            picked = picked + bias.index_select(0, t)
        m = acc = None
        for block in head_blocks(weight.shape[0]):
            # A Slice of the head, which weights.py turns into a DequantizeLinear of the int8 rows: one (V/J, H)
            # fp32 block at a time. Online softmax over the blocks (m: running max; acc: running sum of exp(z - m)
            # times [W | 1], whose last column is the softmax's denominator): one chain, so onnxruntime runs the
            # blocks in order and frees each block's logits before the next.
            w = weight[block]
            z = h @ w.t() + (bias[block] if bias is not None else 0.0)  # (N, V/J)
            zmax = z.max(-1, keepdim=True).values
            new = zmax if m is None else torch.maximum(m, zmax)
            wide = torch.cat([w, w.new_ones(w.shape[0], 1)], 1)  # (V/J, H + 1)
            term = (z - new).exp() @ wide  # (N, H + 1)
            acc = term if acc is None else acc * (m - new).exp() + term
            m = new
        s = acc[:, -1:]  # (N, 1)
        lse = (s.log() + m).squeeze(1)  # log(s) first: see the comment on the loop
        count = valid.sum().clamp(min=1.0)
        total = ((lse - picked) * valid).sum()
        # d loss / d h = (softmax(z) - onehot(t)) @ W = acc / s - W[t], masked: the only thing the backward needs
        ctx.save_for_backward(((acc[:, :-1] / s - rows) * valid[:, None] / count).reshape(hidden.shape))
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out, None, None, None


def head_blocks(vocab: int, blocks: int = HEAD_BLOCKS) -> list[slice]:
    """The vocabulary blocks the loss reads the head in: ``blocks`` contiguous row ranges covering ``vocab``."""
    size = -(-vocab // blocks)
    return [slice(a, min(a + size, vocab)) for a in range(0, vocab, size)]


class _Decoder(nn.Module):
    """The model's decoder stack and output head, callable apart (so the train step skips the full logits).
    Returns (hidden, head weight, head bias, cache, leading virtual positions of hidden)."""

    def __init__(self, lm: nn.Module, feed: DeltaFeed) -> None:
        super().__init__()
        self.lm = lm
        self.feed = feed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: tuple = ()):
        kwargs, skip = model_inputs(self.lm, self.feed, input_ids, attention_mask, past)
        out = self.lm.base_model(**kwargs, use_cache="past_key_values" in kwargs)
        head = self.lm.get_output_embeddings()
        return out.last_hidden_state, head.weight, getattr(head, "bias", None), out.past_key_values, skip


class _Step(nn.Module):
    """The train step with the traced weights swapped in for all of it, the backward pass included: a layer that
    recomputes itself there (exporters/recompute.py) must read them, not the module's own (exported as constants)."""

    def __init__(self, decoder: _Decoder, step: Callable) -> None:
        super().__init__()
        self.decoder = decoder
        self.step = step

    def forward(self, *args):
        return self.step(*args)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder config (Llama-style and GPT-2-style names)."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def cache_layers(config) -> int:
    """Layers whose keys and values model.onnx caches: every layer, or 0 for a family exported without a cache."""
    from edgepeft.exporters.architectures import family_for

    return kv_shape(config)[0] if family_for(config.model_type).kv_cache else 0


def make_lm_functions(model: nn.Module, feed: DeltaFeed, slots: list[Slot], param_names: list[str],
                      recompute: bool = RECOMPUTE) -> tuple[Callable, Callable]:
    """The flat inference function (batch, past..., deltas..., params...) and train step (batch, targets, deltas..., params...);
    ``recompute``: the train step recomputes the trained layers in its backward pass (exporters/recompute.py)."""
    if recompute:
        recompute_layers(model, feed, {s.name: s.module for s in slots})
    decoder = _Decoder(model, feed)
    names = [s.name for s in slots]
    n, layers = len(names), cache_layers(model.config)
    inames = [s.name for s in infer_slots(slots, layers)]
    pnames = ["lm." + p for p in param_names]
    # PEFT scores the first user token from the last virtual one: the train graph's position t predicts token t
    prompted = virtual_tokens(slots, "sequence") > 0

    def run(input_ids, attention_mask, rest, past=(), slot_names=names):
        k = len(slot_names)
        feed.tensors = dict(zip(slot_names, rest[:k]))
        return functional_call(decoder, dict(zip(pnames, rest[k:])), (input_ids, attention_mask, tuple(past)))

    def infer(input_ids, attention_mask, *rest):
        if not layers:  # no cache: logits of the whole sequence, as before issue 16
            hidden, w, b, _, skip = run(input_ids, attention_mask, rest)
            return hidden[:, skip:] @ w.t() + (b if b is not None else 0.0)
        past, rest = rest[:2 * layers], rest[2 * layers:]
        hidden, w, b, cache, skip = run(input_ids, attention_mask, rest, past, inames)
        logits = hidden[:, skip:] @ w.t() + (b if b is not None else 0.0)  # (B, T, V): the user's positions
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, *present)

    def step(input_ids, attention_mask, target_index, target_ids, deltas):
        hidden, w, b, _, skip = decoder(input_ids, attention_mask)  # (B, V + T, H)
        if prompted:  # the states that predict the user's tokens 0 .. T-1
            hidden = hidden[:, skip - 1:skip - 1 + input_ids.shape[1]]  # (B, T, H)
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
        picked = flat.index_select(0, target_index.reshape(-1)).reshape(*target_index.shape, flat.shape[-1])  # (K, M, H)
        loss = ChunkedLinearCrossEntropy.apply(picked, w, b, target_ids)
        extra = feed.regularization()  # a method's own loss term (AdaLoRA's orthogonality)
        loss = loss if extra is None else loss + extra
        return (loss, *torch.autograd.grad(loss, deltas))

    whole = _Step(decoder, step)

    def train(input_ids, attention_mask, target_index, target_ids, *rest):
        feed.tensors = dict(zip(names, rest[:n]))
        weights = dict(zip(["decoder." + p for p in pnames], rest[n:]))
        return functional_call(whole, weights, (input_ids, attention_mask, target_index, target_ids, rest[:n]))

    return infer, train


def export_lm_graphs(model: nn.Module, feed: DeltaFeed, slots: list[Slot], params: dict[str, torch.Tensor],
                     onnx_names: list[str], *, vocab: int, opset: int,
                     progress: Callable[[str], None]) -> dict[str, onnx.ModelProto]:
    """``{"infer": ..., "train": ...}`` of a causal LM; frozen weights are still graph inputs here."""
    from edgepeft.exporters.trace import _example_deltas, _export, infer_dims

    infer, train = make_lm_functions(model, feed, slots, list(params))
    _, kv_heads, head_dim = kv_shape(model.config)
    layers = cache_layers(model.config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, vocab), (2, 8), generator=g)  # batch 2, length 8: 0/1 would be specialized
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    m = 3  # positions per loss chunk in the example
    index = torch.randint(0, ids.numel(), (LOSS_CHUNKS, m), generator=g)  # flat positions b*T + t
    targets = torch.randint(0, vocab, (LOSS_CHUNKS, m), generator=g)
    targets[-1, -1] = -1
    deltas = _example_deltas(slots)
    frozen = list(params.values())
    ideltas = [d for s, d in zip(slots, deltas) if s in infer_slots(slots, layers)]
    b, t, p, mm = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=0), Dim("scored", min=1)
    fixed = [None] * (len(slots) + len(onnx_names))

    progress("tracing and exporting the training step")
    train_scales = dict(feed.scale)
    train_io = lm_graphs(slots, layers)["train"]
    train_model = _export(train, [ids, mask, index, targets, *deltas, *frozen], [*train_io.inputs, *onnx_names],
                          list(train_io.outputs), [{0: b, 1: t}, {0: b, 1: t}, {1: mm}, {1: mm}, *fixed], opset)

    progress("tracing and exporting the inference graph" + (" (with a KV cache)" if layers else ""))
    feed.scale = {k: 1.0 for k in train_scales}  # the runtime feeds s*B
    past = [torch.randn(2, kv_heads, 3, head_dim, generator=g) for _ in range(2 * layers)]
    rank_dyn = infer_dims(infer_slots(slots, layers))
    infer_io = lm_graphs(slots, layers)["infer"]
    try:
        infer_model = _export(infer, [ids, mask, *past, *[d.detach() for d in ideltas], *frozen],
                              [*infer_io.inputs, *onnx_names], list(infer_io.outputs),
                              [{0: b, 1: t}, {0: b, 1: t}, *[{0: b, 2: p}] * len(past), *rank_dyn,
                               *[None] * len(onnx_names)], opset)
    finally:
        feed.scale = train_scales
    return {"infer": infer_model, "train": train_model}


def infer_slots(slots: list[Slot] | tuple[Slot, ...], layers: int) -> list[Slot]:
    """The slots model.onnx takes: with a KV cache, a prefix is not one of them but the cache of a call's start
    (the runtime feeds it as the past keys and values: runtime/kv_cache.py), as PEFT hands it to the model."""
    return [s for s in slots if not (layers and owner(s.kind).virtual == "prefix")]


def lm_graphs(slots: list[Slot] | tuple[Slot, ...], layers: int) -> dict[str, Graph]:
    """The manifest's graph entries of a causal LM: inputs and outputs of model.onnx and train.onnx."""
    slot_names = [s.name for s in slots]
    infer_names = [s.name for s in infer_slots(slots, layers)]
    past = [past_name(i, k) for i in range(layers) for k in KV]
    present = [present_name(i, k) for i in range(layers) for k in KV]
    return {
        "infer": Graph(INFER_GRAPH_FILE, (INPUT_IDS, ATTENTION_MASK, *past, *infer_names), (LOGITS, *present)),
        "train": Graph(TRAIN_GRAPH_FILE, (INPUT_IDS, ATTENTION_MASK, TARGET_INDEX, TARGET_IDS, *slot_names),
                       (LOSS, *map(grad_name, slot_names))),
    }
