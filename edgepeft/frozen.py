"""A bundle's frozen base weights in numpy (no onnxruntime): read from weights.json + weights.bin, dequantized.

Shared by the device (``runtime.weights``: memory-mapped from the bundle folder) and the hub (from its
stored blobs): methods whose aggregation depends on the base weight (DoRA's row norms) read them here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from edgepeft.errors import BundleError
from edgepeft.manifest import Manifest
from edgepeft.names import FROZEN_PREFIX

IN_OUT_KEY = "in_out_modules"  # manifest.extra: modules whose frozen weight is stored (in, out) (GPT-2's Conv1D)

BaseWeights = Callable[[str], np.ndarray]  # module path -> its frozen weight as (out, in), float64


def _unpack_int4(raw: np.ndarray, count: int) -> np.ndarray:
    lo = (raw & 0x0F).astype(np.int8)
    hi = (raw >> 4).astype(np.int8)
    both = np.stack([lo, hi], -1).reshape(-1)[:count]
    return np.where(both > 7, both - 16, both).astype(np.int8)


def frozen_arrays(index: Mapping[str, Any], data: np.ndarray) -> dict[str, np.ndarray]:
    """Every frozen base weight by torch parameter path, float weights dequantized to float32.

    ``index``: weights.json; ``data``: the bytes of weights.bin as a uint8 array (a memory map is fine)."""
    def tensor(name: str) -> np.ndarray:
        t = index["tensors"][name]
        raw = data[t["offset"]: t["offset"] + t["length"]]
        count = int(np.prod(t["shape"], dtype=np.int64))
        if t["dtype"] == "int4":
            return _unpack_int4(np.asarray(raw), count).reshape(t["shape"])
        return np.frombuffer(raw, dtype=np.dtype(t["dtype"]), count=count).reshape(t["shape"])

    out: dict[str, np.ndarray] = {}
    for name, q in index["quantized"].items():
        qv, scale = tensor(name + ".q"), tensor(name + ".scale")
        if q["block"] is None:
            shape = [1] * qv.ndim
            shape[q["axis"]] = -1
            w = qv.astype(np.float32) * scale.reshape(shape)
        else:
            s = np.repeat(scale, q["block"], axis=q["axis"])
            w = qv.astype(np.float32) * np.take(s, np.arange(qv.shape[q["axis"]]), axis=q["axis"])
        out[name] = w
    for name in index["tensors"]:
        base = name.rsplit(".", 1)[0] if name.endswith((".q", ".scale")) else None
        if base is None or base not in index["quantized"]:
            out.setdefault(name, np.array(tensor(name)))
    return {k[len(FROZEN_PREFIX):]: v for k, v in out.items() if k.startswith(FROZEN_PREFIX)}


def base_weights(frozen: Mapping[str, np.ndarray], manifest: Manifest) -> BaseWeights:
    """module -> its frozen weight as (out, in) float64, exactly what the bundle's graphs compute with."""
    in_out = set(manifest.extra.get(IN_OUT_KEY, ()))

    def weight(module: str) -> np.ndarray:
        w = frozen.get(module + ".weight")
        if w is None or w.ndim != 2:
            raise BundleError(f"bundle has no frozen 2-D weight for module {module!r}")
        return (w.T if module in in_out else w).astype(np.float64)

    return weight
