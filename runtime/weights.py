"""Read a bundle's frozen weights with numpy alone (memory-mapped), dequantized on request.

Used where the base weights themselves are needed outside onnxruntime: a PEFT adapter's
``modules_to_save`` (full head weights), and references built on exactly the bundle's weights.
"""

from __future__ import annotations

import json

import numpy as np

from edgepeft.errors import BundleError
from edgepeft.names import FROZEN_PREFIX, WEIGHTS_INDEX_FILE
from edgepeft.runtime.bundle import Bundle


def _unpack_int4(raw: np.ndarray, count: int) -> np.ndarray:
    lo = (raw & 0x0F).astype(np.int8)
    hi = (raw >> 4).astype(np.int8)
    both = np.stack([lo, hi], -1).reshape(-1)[:count]
    return np.where(both > 7, both - 16, both).astype(np.int8)


def read_frozen(bundle: Bundle) -> dict[str, np.ndarray]:
    """Every frozen base weight by torch parameter path, float weights dequantized to float32."""
    path = bundle.path / WEIGHTS_INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: cannot be read ({e})") from None
    data = np.memmap(bundle.path / bundle.manifest.weights, dtype=np.uint8, mode="r")

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
