"""Recompute the trained decoder layers in the backward pass of train.onnx (activation checkpointing).

A trained layer's backward needs its internals (MLP activations, attention probabilities, q/k/v): at
SmolLM2-135M's batch 4 x 256 that is ~48 MB per layer, ~480 MB for the top 10 layers, most of a
causal LM's training peak. Here each such layer keeps only its input; its backward runs the layer
again and differentiates that. The gradients are the same computation, so they stay exact.

Two things make it hold in onnxruntime, which sees one static graph, not a backward "later":
the recomputation reads the gradient arriving at the layer's output (``x + 0 * g[0]``), so it can
neither be scheduled before the backward reaches the layer nor be merged with the forward's
identical nodes by common-subexpression elimination.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from edgepeft.exporters.inject import DeltaFeed


class _Recompute(torch.autograd.Function):
    """``run(x)`` with only ``x`` saved; the backward recomputes ``run`` from the saved input and differentiates it
    with respect to ``x`` (when it needs a gradient) and the layer's delta tensors."""

    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], torch.Tensor], feed: DeltaFeed, names: list[str], wants_x: bool,
                x: torch.Tensor, *deltas: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.feed, ctx.names, ctx.wants_x = run, feed, names, wants_x
        ctx.save_for_backward(x, *deltas)
        return run(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *deltas = ctx.saved_tensors
        # the data dependency on the incoming gradient (see the module docstring); adds an exact zero
        x = (x + grad.reshape(-1)[:1] * 0).detach().requires_grad_(ctx.wants_x)
        leaves = [d.detach().requires_grad_() for d in deltas]
        outer = ctx.feed.tensors
        ctx.feed.tensors = {**outer, **dict(zip(ctx.names, leaves))}
        try:
            with torch.enable_grad():
                y = ctx.run(x)
        finally:
            ctx.feed.tensors = outer
        wrt = ([x] if ctx.wants_x else []) + leaves
        grads = list(torch.autograd.grad(y, wrt, grad, allow_unused=True))
        gx = grads.pop(0) if ctx.wants_x else None
        return (None, None, None, None, gx, *grads)


def _checkpointed(forward: Callable, feed: DeltaFeed, names: list[str], hidden: torch.Tensor, *args, **kwargs):
    """The layer's forward through :class:`_Recompute` when its output needs a gradient, else the plain forward."""
    present = [n for n in names if n in feed.tensors and feed.tensors[n].requires_grad]
    wants_x = hidden.requires_grad
    if not torch.is_grad_enabled() or not (wants_x or present):
        return forward(hidden, *args, **kwargs)
    run = functools.partial(_call, forward, args, kwargs)
    return _Recompute.apply(run, feed, present, wants_x, hidden, *(feed.tensors[n] for n in present))


def _call(forward: Callable, args: tuple, kwargs: dict, x: torch.Tensor) -> torch.Tensor:
    return forward(x, *args, **kwargs)


def recompute_layers(model: nn.Module, feed: DeltaFeed, slot_modules: dict[str, str]) -> int:
    """Make every decoder layer of ``model`` (HF's checkpointable layers) recompute itself in the backward pass;
    ``slot_modules`` maps slot name -> module path. Returns how many layers were wrapped.

    Not for virtual-token methods (their deltas reach the layers through the cache, not through the layer's input)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if feed.virtual:
        return 0
    wrapped = 0
    for path, layer in model.named_modules():
        if isinstance(layer, GradientCheckpointingLayer):
            names = sorted(n for n, m in slot_modules.items() if m.startswith(path + "."))
            layer.forward = functools.partial(_checkpointed, layer.forward, feed, names)
            wrapped += 1
    return wrapped
