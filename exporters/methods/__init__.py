"""The torch half of each method: how its slots enter a layer's forward pass (workstation side only).

Each registered method (``edgepeft.methods``) has one :class:`TorchMethod` here, registered under the
same name; ``inject.DeltaLayer`` calls ``pre`` (on the layer's input) and ``post`` (on its output) of
every method with slots on the layer, in registration order; the frozen layer itself runs between them
unless a method computes its output another way (``replace``: BN tuning's one scale and shift).
"""

from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import torch
from torch import nn

from edgepeft.errors import ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import MethodConfig
from edgepeft.methods import names as method_names

_HOOKS: dict[str, "TorchMethod"] = {}


def weight_of(base: nn.Module) -> torch.Tensor:
    """The frozen weight of a linear-like module as (out, in) (GPT-2's Conv1D stores (in, out))."""
    return base.weight.t() if type(base).__name__ == "Conv1D" else base.weight


def bias_of(base: nn.Module) -> torch.Tensor | None:
    return getattr(base, "bias", None)


class TorchMethod:
    """A method's forward pass. ``t`` holds the layer's slots of this method by kind; ``scale`` is the
    delta's LoRA scale (1 in the inference graph, where the runtime folds it into the feeds)."""

    name: ClassVar[str]
    absorbs: ClassVar[tuple[str, ...]] = ()  # other methods' slot kinds on the layer that ``replace`` folds in

    def pre(self, layer: nn.Module, x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return x

    def replace(self, layer: nn.Module, x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The frozen layer's output with this method's slots folded in, computed in one go, or None: the frozen
        layer runs and ``post`` adds to its output. At most one method per layer may replace."""
        return None

    def post(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, t: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        return y

    def inputs(self, x, t: dict[str, torch.Tensor], config: MethodConfig):
        """A virtual-token method's change to the model's input (``exporters.virtual.VirtualInputs`` in and out)."""
        return x

    def regularizer(self, tensors: dict[str, torch.Tensor], config: MethodConfig) -> torch.Tensor | None:
        """A term the method adds to the training loss, from its slots ``{slot name: tensor}`` (every module), or None."""
        return None

    def frozen(self, slots: Sequence[Slot], bases: Mapping[str, nn.Module], config: MethodConfig) -> dict[str, dict[str, torch.Tensor]]:
        """Frozen tensors the method adds to the bundle (VeRA's shared projections, LoRA-XS's SVD factors), as
        ``{module path: {buffer name: tensor}}``; ``""`` is the model root. They become buffers there, so export stores
        them in weights.bin (fingerprinted) like the base weights; one tensor object under several paths is stored once,
        under the first path in module order (the root first). ``bases``: each slotted module's frozen base layer."""
        return {}


def register_torch(hook: TorchMethod) -> TorchMethod:
    """Register the torch half of the method ``hook.name``; a second registration is refused."""
    if hook.name in _HOOKS:
        raise ValueError(f"torch half of method {hook.name!r} is already registered")
    _HOOKS[hook.name] = hook
    return hook


def torch_method(name: str) -> TorchMethod:
    """The torch half of method ``name``."""
    if name not in _HOOKS:
        raise ExportError(f"method {name!r} has no torch half registered in edgepeft.exporters.methods")
    return _HOOKS[name]


def _builtin() -> None:
    import importlib

    for name in method_names():  # one module per method, named like it
        importlib.import_module(f"edgepeft.exporters.methods.{name}")


_builtin()
