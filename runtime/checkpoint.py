"""Training checkpoints: one safetensors file holding every array and, in its metadata, the JSON state.

One file, replaced atomically, so a crash (even SIGKILL during the write) leaves either the previous
checkpoint or the new one, never a mix of arrays from one step and counters from another. No pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from edgepeft import atomic
from edgepeft.errors import TrainError

FORMAT = "edgepeft-checkpoint"
VERSION = "1"
CHECKPOINT_FILE = "checkpoint.safetensors"


def checkpoint_path(directory: str | os.PathLike) -> Path:
    """Where the checkpoint of ``directory`` lives."""
    return Path(os.fspath(directory)) / CHECKPOINT_FILE


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a checkpoint."""
    return checkpoint_path(directory).is_file()


def save_checkpoint(directory: str | os.PathLike, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> Path:
    """Write arrays (float32) and a JSON-able state as this directory's checkpoint, atomically."""
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    md = {"format": FORMAT, "version": VERSION, "state": json.dumps(state, sort_keys=True)}
    path = checkpoint_path(directory)
    atomic.write_bytes(path, safetensors.numpy.save(tensors, metadata=md))
    return path


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and state of this directory's checkpoint; anything unreadable is a TrainError."""
    path = checkpoint_path(directory)
    if not path.is_file():
        raise TrainError(f"{path}: no checkpoint to resume from")
    data = path.read_bytes()
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n]) if 0 < n <= len(data) - 8 else None
        md = header.get("__metadata__", {}) if isinstance(header, dict) else {}
        if md.get("format") != FORMAT:
            raise ValueError("not an edgepeft checkpoint")
        if md.get("version") != VERSION:
            raise ValueError(f"checkpoint version {md.get('version')!r}, this edgepeft reads {VERSION}")
        arrays = safetensors.numpy.load(data)
        state = json.loads(md["state"])
    except Exception as e:  # safetensors and json raise several untyped errors for damaged files
        raise TrainError(f"{path}: cannot be read ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); "
                         "remove it to start over") from None
    return arrays, state
