"""Put delta slots into a torch model: each layer with slots reads its deltas from a shared feed.

Deltas are *inputs* of the traced function, not parameters (see shared/notes/train-step-export.md):
the traced step sets ``feed.tensors`` and runs the model; a ``DeltaLinear`` runs, for every method
with slots on it (in registration order), the method's torch half (``edgepeft.exporters.methods``):

    x = pre(x)   (IA3 on a feed-forward input: x * l)
    y = base(x)
    y = post(y)  (LoRA: y + s * (x @ A.T) @ B.T; BitFit: y + db; head: y + x @ dW.T; IA3: y * l ...)

for whichever of its slots are present in the feed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from edgepeft import methods
from edgepeft.errors import ExportError
from edgepeft.manifest import Slot
from edgepeft.exporters.architectures import Family, layer_index
from edgepeft.exporters.methods import TorchMethod, torch_method


@dataclass
class DeltaFeed:
    """The tensors the traced function hands to every DeltaLinear, keyed by slot name."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)  # LoRA-family scale per module; 1.0 in the inference graph
    # virtual-token methods (exporters/virtual.py): (torch half, {kind: slot name}, config), in registration order
    virtual: list[tuple[TorchMethod, dict[str, str], methods.MethodConfig]] = field(default_factory=list)
    # every module method: (torch half, its slot names, config), for its loss term (TorchMethod.regularizer)
    owned: list[tuple[TorchMethod, list[str], methods.MethodConfig]] = field(default_factory=list)

    def regularization(self) -> torch.Tensor | None:
        """The methods' extra loss terms on the fed tensors (AdaLoRA's orthogonality), None when no method has one."""
        terms = [r for h, names, config in self.owned
                 if (r := h.regularizer({n: self.tensors[n] for n in names if n in self.tensors}, config)) is not None]
        return torch.stack(terms).sum() if terms else None


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

    def __init__(self, base: nn.Module, path: str, feed: DeltaFeed,
                 groups: Sequence[tuple[TorchMethod, Mapping[str, str]]] = ()) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.feed = feed
        self.groups = list(groups)  # (method's torch half, {kind: slot name}) in registration order
        self.configs: dict[str, methods.MethodConfig] = {}  # per method, its options (set by inject)

    def _present(self) -> list[tuple[TorchMethod, dict[str, torch.Tensor]]]:
        """(method, {kind: fed tensor}) for each method with a slot of this layer in the feed."""
        t = self.feed.tensors
        present = [(h, {k: t[n] for k, n in kinds.items() if n in t}) for h, kinds in self.groups]
        return [(h, g) for h, g in present if g]

    def replacing(self, method: str) -> dict[str, torch.Tensor] | None:
        """What ``method``'s ``replace`` gets on this layer (its fed slots and those it absorbs), None when it has none fed."""
        present = self._present()
        mine = [g for h, g in present if h.name == method]
        if not mine:
            return None
        absorbs = torch_method(method).absorbs
        return {**{k: v for _, g in present for k, v in g.items() if k in absorbs}, **mine[0]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        present = self._present()
        for h, g in present:
            x = h.pre(self, x, g)
        replaced = []
        for h, g in present:  # a replacing method may fold in other methods' slots (BN tuning: BitFit's shift)
            extra = {k: v for h2, g2 in present if h2 is not h for k, v in g2.items() if k in h.absorbs}
            if (y := h.replace(self, x, {**extra, **g})) is not None:
                replaced.append((h.name, y, set(extra)))
        if len(replaced) > 1:
            raise ExportError(f"{self.path}: methods {', '.join(n for n, _, _ in replaced)} each compute the layer's output; "
                              "combine at most one of them on a layer")
        y = replaced[0][1] if replaced else self.base(x)
        absorbed = replaced[0][2] if replaced else set()
        scale = self.feed.scale.get(self.path, 1.0)
        for h, g in present:
            if g := {k: v for k, v in g.items() if k not in absorbed}:
                y = h.post(self, x, y, g, scale)
        return y


def canonical_param(name: str, wrapped: set[str]) -> str:
    """A parameter's path in the source model: ``x.query.base.weight`` -> ``x.query.weight`` for a wrapped module."""
    mod, _, leaf = name.rpartition(".")
    return f"{mod[:-5]}.{leaf}" if mod.endswith(".base") and mod[:-5] in wrapped else name


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
    chosen: Sequence[methods.Method],
    configs: Mapping[str, methods.MethodConfig],
    head: bool,
    top_layers: int | None,
    max_length: int = 0,
) -> list[Slot]:
    """Decide every delta slot of the model (pure: does not change the model); each method plans its own."""
    from edgepeft.exporters.causal_lm import kv_shape

    linears = {name: dims for name, mod in model.named_modules() if (dims := linear_dims(mod)) is not None}
    layers = layers_of(model, family)
    keep_layers = set(layers[-top_layers:]) if top_layers else set(layers)  # a count from resolve_top_layers
    n_layers, kv_heads, head_dim = kv_shape(model.config)
    view = methods.ModelView(linears, lambda name: layer_index(family, name) in keep_layers, family.defaults, head,
                             hidden=int(model.get_input_embeddings().embedding_dim), layers=n_layers, kv_heads=kv_heads,
                             head_dim=head_dim, max_length=max_length)
    slots: dict[str, Slot] = {}
    for m in chosen:
        for s in m.plan(view, configs.get(m.name) or m.config_cls()):
            slots.setdefault(s.name, s)  # the head's bias may be BitFit's slot already
    return sorted(slots.values(), key=lambda s: s.name)


def inject(model: nn.Module, slots: list[Slot], configs: Mapping[str, methods.MethodConfig] | None = None) -> DeltaFeed:
    """Wrap every module that has a slot in a DeltaLinear sharing one feed, add each method's frozen tensors
    as buffers (``TorchMethod.frozen``); return the feed."""
    feed = DeltaFeed()
    for module, groups in methods.by_module(s.name for s in slots if not methods.owner(s.kind).virtual).items():
        parent_path, _, leaf = module.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        hooks = [(torch_method(m.name), kinds) for m, kinds in groups.items()]
        setattr(parent, leaf, DeltaLinear(getattr(parent, leaf), module, feed, hooks))
    for m in methods.get_all():
        mine = [s for s in slots if methods.owner(s.kind) is m]
        if not mine:
            continue
        config = (configs or {}).get(m.name) or m.config_cls()
        if m.virtual:  # it changes the model's input, not a module (exporters/virtual.py)
            feed.virtual.append((torch_method(m.name), {s.kind: s.name for s in mine}, config))
            continue
        feed.owned.append((torch_method(m.name), [s.name for s in mine], config))
        bases = {s.module: model.get_submodule(s.module).base for s in mine}
        for module in bases:
            model.get_submodule(module).configs[m.name] = config
        for path, tensors in sorted(torch_method(m.name).frozen(mine, bases, config).items()):  # "" (the root) first
            for name, t in tensors.items():
                model.get_submodule(path).register_buffer(name, t)
    for s in slots:
        if s.rank:
            feed.scale[s.module] = s.scale
    return feed
