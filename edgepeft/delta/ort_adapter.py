"""Export a delta as an ONNX Runtime adapter file (``.onnx_adapter``), for ORT's multi-LoRA inference path."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime

from edgepeft import atomic
from edgepeft.delta.format import Delta, check_structure
from edgepeft.names import LORA_B, split_slot_name


def model_version(base_fingerprint: str) -> int:
    """A stable 31-bit number for a base fingerprint: ORT adapters carry an int model version, not a string."""
    return int(hashlib.sha256(base_fingerprint.encode("utf-8")).hexdigest()[:8], 16) & 0x7FFFFFFF


def adapter_arrays(delta: Delta) -> dict[str, np.ndarray]:
    """The parameters as written: slot names, LoRA B pre-multiplied by the scale (the graph has none)."""
    out = {}
    for name, t in sorted(delta.tensors.items()):
        if split_slot_name(name)[1] == LORA_B:
            t = t * np.float32(delta.scale)  # model.onnx computes y += (x A^T) B^T
        out[name] = np.ascontiguousarray(t, dtype=np.float32)
    return out


def to_ort_adapter(delta: Delta, out_path: str | os.PathLike) -> None:
    """Write ``delta`` to ``out_path`` in onnxruntime's adapter format (adapter version = meta.version)."""
    check_structure(delta, os.fspath(out_path))
    arrays = adapter_arrays(delta)
    fmt = onnxruntime.AdapterFormat()
    fmt.set_adapter_version(delta.meta.version)
    fmt.set_model_version(model_version(delta.meta.base_fingerprint))
    # the OrtValues borrow the arrays' memory: keep `arrays` alive until the export is done
    fmt.set_parameters({n: onnxruntime.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()})
    with tempfile.TemporaryDirectory() as tmp:  # ORT writes in place; go through atomic.write_bytes instead
        fmt.export_adapter(os.path.join(tmp, "adapter.onnx_adapter"))
        atomic.write_bytes(out_path, Path(tmp, "adapter.onnx_adapter").read_bytes())
