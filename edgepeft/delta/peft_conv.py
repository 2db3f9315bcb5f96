"""What a convolutional bundle's delta looks like in a PEFT adapter, and back.

- LoRA on a Conv2d is PEFT's ``lora.Conv2d``: A is a convolution with the layer's kernel into r channels, B a 1x1
  convolution back, so PEFT stores A as (r, in, kh, kw) and B as (out, r, 1, 1) where the slots hold them flattened
  to (r, in·kh·kw) and (out, r) (the same numbers, row-major). Which modules are convolutions, and their kernels,
  comes from the bundle's frozen weights: a 4-D ``<module>.weight``.
- BatchNorm tuning (``bn``: γ and β deltas, running statistics frozen) is no PEFT method; PEFT carries it as a
  ``modules_to_save`` copy of each norm, stored whole (γ + Δγ, β + Δβ). The copy's running statistics must be the
  bundle's: a PEFT adapter trained in train mode re-estimated them, which no edgepeft delta can hold.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from edgepeft.errors import DeltaError

BUFFERS = re.compile(r"^(?P<m>.+?)(?:\.modules_to_save(?:\.[^.]+)?)?\.(?P<p>running_mean|running_var|num_batches_tracked)$")


def conv_kernel(base_weights: Mapping[str, np.ndarray] | None, module: str, where: str) -> tuple[int, ...] | None:
    """The (out, in, kh, kw) shape of ``module``'s frozen convolution weight; None for a Linear."""
    if base_weights is None:
        raise DeltaError(f"{where}: {module!r} of a convolutional bundle: PEFT stores LoRA on a Conv2d as 4-D "
                         "tensors, so converting needs the kernel shapes from the base weights: give a bundle with "
                         "its weights file (CLI --bundle)")
    w = base_weights.get(f"{module}.weight")
    if w is None:
        raise DeltaError(f"{where}: base_weights lacks {module + '.weight'!r}")
    return tuple(w.shape) if np.ndim(w) == 4 else None


def lora_to_conv(kind_is_a: bool, t: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """A flattened LoRA A (r, in·kh·kw) or B (out, r) slot as PEFT's lora.Conv2d weight."""
    _, c_in, kh, kw = kernel
    return t.reshape(t.shape[0], c_in, kh, kw) if kind_is_a else t.reshape(*t.shape, 1, 1)


def flatten_conv(v: np.ndarray) -> np.ndarray:
    """PEFT's 4-D lora.Conv2d weight as the slot's 2-D form (a 2-D tensor is returned as is)."""
    return v.reshape(v.shape[0], -1) if v.ndim == 4 else v


def norm_buffers(base_weights: Mapping[str, np.ndarray], module: str, where: str) -> dict[str, np.ndarray]:
    """The running statistics of a norm's modules_to_save copy: the bundle's (PEFT's loader wants every key of it)."""
    out = {}
    for name in ("running_mean", "running_var"):
        if f"{module}.{name}" not in base_weights:
            raise DeltaError(f"{where}: base_weights lacks {module + '.' + name!r}")
        out[name] = np.asarray(base_weights[f"{module}.{name}"], np.float32)
    out["num_batches_tracked"] = np.asarray(base_weights.get(f"{module}.num_batches_tracked", 0), np.float32)
    return out


def check_buffer(base_weights: Mapping[str, np.ndarray] | None, module: str, name: str, value: np.ndarray,
                 where: str, key: str) -> None:
    """Accept a norm's running statistic in a PEFT adapter only where it is the bundle's own."""
    if name == "num_batches_tracked":
        return  # a counter; eval-mode inference never reads it
    base = None if base_weights is None else base_weights.get(f"{module}.{name}")
    base = None if base is None else np.asarray(base, np.float32)
    if base is None or base.shape != value.shape or not np.allclose(base, value.astype(np.float32), rtol=1e-6, atol=1e-7):
        raise DeltaError(f"{where}: {key!r} differs from the bundle's {name} (or no base weights were given): the adapter "
                         "re-estimated BatchNorm statistics, which edgepeft keeps frozen; train the PEFT model in eval mode")
