"""Put delta slots into a torch model: each target linear layer reads its deltas from a shared feed.

Deltas are *inputs* of the traced function, not parameters (see shared/notes/train-step-export.md):
the traced step sets ``feed.tensors`` and runs the model; a ``DeltaLinear`` adds

    y = base(x) + scale * (x @ A.T) @ B.T   (lora_A, lora_B)
        + x @ dW.T                           (weight: full delta, classifier heads)
        + db                                 (bias)

for whichever of its slots are present in the feed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from edgepeft.errors import ExportError
from edgepeft.manifest import Slot
from edgepeft.names import BIAS, LORA_A, LORA_B, WEIGHT, slot_name
from edgepeft.exporters.architectures import Family, layer_index, matches


@dataclass
class DeltaFeed:
    """The tensors the traced function hands to every DeltaLinear, keyed by slot name."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_scale: dict[str, float] = field(default_factory=dict)  # per module; 1.0 in the inference graph


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear-like module, None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return None


class DeltaLinear(nn.Module):
    """A frozen linear-like layer plus whatever deltas the feed holds for it."""

    def __init__(self, base: nn.Module, path: str, feed: DeltaFeed) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.feed = feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        t = self.feed.tensors
        a, b = t.get(slot_name(self.path, LORA_A)), t.get(slot_name(self.path, LORA_B))
        if a is not None and b is not None:
            y = y + ((x @ a.t()) @ b.t()) * self.feed.lora_scale.get(self.path, 1.0)
        w = t.get(slot_name(self.path, WEIGHT))
        if w is not None:
            y = y + x @ w.t()
        db = t.get(slot_name(self.path, BIAS))
        if db is not None:
            y = y + db
        return y


def auto_top_layers(n_layers: int) -> int:
    """The export default: slots in the top third of the layers, at least 2 (all-MiniLM-L6-v2: the top 2 of 6).

    The backward pass stops below the lowest trained layer, so this is the lever with the largest
    effect on a device's step time and activation memory; on Rotten Tomatoes it reaches 75 %
    validation accuracy at the same step as every-layer LoRA (benchmarks/results/time_to_accuracy.json).
    """
    return min(n_layers, max(2, -(-n_layers // 3)))


def layers_of(model: nn.Module, family: Family) -> list[int]:
    """The indices of the model's layers that hold linear modules, in order."""
    return sorted({i for name, mod in model.named_modules()
                   if linear_dims(mod) is not None and (i := layer_index(family, name)) is not None})


def resolve_top_layers(n_layers: int, top_layers: int | str | None) -> int | None:
    """``top_layers`` as a count of the last layers to train, ``None`` for every layer; ``"auto"`` is
    :func:`auto_top_layers`, ``"all"`` every layer."""
    if top_layers is None or top_layers == "all":
        return None
    if top_layers == "auto":
        top_layers = auto_top_layers(n_layers)
    if isinstance(top_layers, str):
        raise ExportError(f"--top-layers {top_layers!r}: expected a number of layers, 'auto' or 'all'")
    if not 0 < top_layers <= n_layers:
        raise ExportError(f"--top-layers {top_layers}: the model has {n_layers} layers")
    return None if top_layers == n_layers else top_layers


def plan_slots(
    model: nn.Module,
    family: Family,
    *,
    method: str,
    rank: int,
    alpha: float,
    targets: tuple[str, ...],
    head: bool,
    top_layers: int | None,
) -> list[Slot]:
    """Decide every delta slot of the model (pure: does not change the model)."""
    linears = {name: dims for name, mod in model.named_modules() if (dims := linear_dims(mod)) is not None}
    layers = layers_of(model, family)
    keep_layers = set(layers[-top_layers:]) if top_layers else set(layers)  # a count from resolve_top_layers

    def in_scope(name: str) -> bool:
        return layer_index(family, name) in keep_layers

    slots: list[Slot] = []
    if "lora" in method:
        for pattern in targets:
            if not any(matches(n, pattern) for n in linears):
                sample = ", ".join(sorted(linears)[:6])
                raise ExportError(f"target pattern {pattern!r} matches no linear module; modules look like: {sample}, ...")
        for name, (fin, fout) in linears.items():
            if any(matches(name, p) for p in targets) and in_scope(name):
                slots.append(Slot(slot_name(name, LORA_A), LORA_A, name, (rank, fin), rank=rank, alpha=alpha, init="kaiming_uniform"))
                slots.append(Slot(slot_name(name, LORA_B), LORA_B, name, (fout, rank), rank=rank, alpha=alpha, init="zeros"))
    if "bitfit" in method:
        for name, (_, fout) in linears.items():
            leaf = name.rsplit(".", 1)[-1]
            if in_scope(name) and leaf not in family.bitfit_exclude:
                slots.append(Slot(slot_name(name, BIAS), BIAS, name, (fout,)))
    if head:
        found = [n for n in linears if n in family.head_modules]
        if not found:
            raise ExportError(f"no classifier head found (looked for {', '.join(family.head_modules)})")
        for name in found:
            fin, fout = linears[name]
            slots.append(Slot(slot_name(name, WEIGHT), WEIGHT, name, (fout, fin)))
            if not any(s.name == slot_name(name, BIAS) for s in slots):
                slots.append(Slot(slot_name(name, BIAS), BIAS, name, (fout,)))
    slots.sort(key=lambda s: s.name)
    return slots


def inject(model: nn.Module, slots: list[Slot]) -> DeltaFeed:
    """Wrap every module that has a slot in a DeltaLinear sharing one feed; return the feed."""
    feed = DeltaFeed()
    for module in sorted({s.module for s in slots}):
        parent_path, _, leaf = module.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, DeltaLinear(getattr(parent, leaf), module, feed))
    for s in slots:
        if s.kind == LORA_A:
            feed.lora_scale[s.module] = s.scale
    return feed
