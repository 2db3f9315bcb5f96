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

from edgepeft import atomic, schema
from edgepeft.delta import safeio
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
    atomic.write_bytes(path, safeio.save(tensors, md))
    return path


MAX_HEADER_BYTES = 16 * 2**20
_COUNT = (0, 2**53)


def check_state(state: Any) -> dict[str, Any]:
    """The checkpoint's JSON state, after checking every field the trainer restores (types and ranges)."""
    f = schema.Fields(state, "state.")
    for key in ("step", "epoch", "position", "samples", "bad_evals"):
        f.integer(key, *_COUNT)
    f.integer("last_eval_step", -1, _COUNT[1])
    f.typed("identity", dict)
    f.typed("stopped", bool)
    schema.Fields(f.typed("optimizer", dict), "state.optimizer.").integer("step", *_COUNT)
    rng = schema.Fields(f.typed("epoch_rng", dict), "state.epoch_rng.")
    rng.text("bit_generator", 32, check=lambda v: v == "PCG64", what="'PCG64'")
    inner = schema.Fields(rng.typed("state", dict), "state.epoch_rng.state.")
    inner.integer("state", 0, 2**128 - 1)
    inner.integer("inc", 0, 2**128 - 1)
    rng.integer("has_uint32", 0, 1)
    rng.integer("uinteger", 0, 2**32 - 1)
    losses = f.items("losses", 10**7)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in losses):
        raise f.bad("losses", "must be a list of numbers")
    for key in ("before", "best"):
        if f.typed(key, (dict, type(None))) is not None and key == "best":
            best = schema.Fields(state["best"], "state.best.")
            best.typed("metrics", dict)
            best.integer("step", *_COUNT)
            best.integer("samples", *_COUNT)
    return state


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and state of this directory's checkpoint; anything unreadable is a TrainError."""
    path = checkpoint_path(directory)
    if not path.is_file():
        raise TrainError(f"{path}: no checkpoint to resume from")
    data = path.read_bytes()
    try:
        n = int.from_bytes(data[:8], "little")
        if not 0 < n <= min(len(data) - 8, MAX_HEADER_BYTES):
            raise ValueError(f"header length {n} does not fit the {len(data)}-byte file")
        header = schema.loads(data[8:8 + n], max_bytes=MAX_HEADER_BYTES)
        md = header.get("__metadata__", {}) if isinstance(header, dict) else {}
        if not isinstance(md, dict) or md.get("format") != FORMAT:
            raise ValueError("not an edgepeft checkpoint")
        if md.get("version") != VERSION:
            raise ValueError(f"checkpoint version {schema.short(md.get('version'))}, this edgepeft reads {VERSION}")
        state = check_state(schema.loads(md.get("state", ""), allow_nan=True))  # a NaN loss is a fact worth keeping
        arrays = safetensors.numpy.load(data)
    except Exception as e:  # safetensors and json raise several untyped errors for damaged files
        raise TrainError(f"{path}: cannot be read ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); "
                         "remove it to start over") from None
    return arrays, state
