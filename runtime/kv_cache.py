"""The KV cache of a causal LM's model.onnx: which inputs hold it, an empty one, and feeding outputs back.

model.onnx of a causal LM exported since issue 16 takes ``past.<layer>.<key|value>`` (B, heads, P, D)
and returns ``present.<layer>.<key|value>`` (B, heads, P + T, D). An empty cache (P = 0) is a call
without one. Bundles exported before have no cache inputs; :func:`cache_specs` is then empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edgepeft.manifest import Manifest
from edgepeft.methods import owner
from edgepeft.names import past_name, present_name, split_slot_name

PAST_PREFIX = past_name(0, "key").split(".")[0] + "."


@dataclass(frozen=True)
class CacheSpec:
    """One cache input of model.onnx: its name, the output that continues it, heads and head size."""

    past: str
    present: str
    heads: int
    head_dim: int


def cache_specs(session: ort.InferenceSession) -> list[CacheSpec]:
    """The session's cache inputs in graph order (empty for a graph without a KV cache)."""
    out = []
    for i in session.get_inputs():
        if i.name.startswith(PAST_PREFIX):
            _, layer, kind = i.name.split(".")
            out.append(CacheSpec(i.name, present_name(int(layer), kind), int(i.shape[1]), int(i.shape[3])))
    return out


def empty_cache(specs: list[CacheSpec], batch: int) -> dict[str, np.ndarray]:
    """Feeds of an empty cache (P = 0) for ``batch`` sequences."""
    return {s.past: np.zeros((batch, s.heads, 0, s.head_dim), np.float32) for s in specs}


def first_call(manifest: Manifest, specs: list[CacheSpec], batch: int,
               slots: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(cache feeds, slot feeds) of a causal LM's first call. A prefix-tuning delta's prefix (V, 2·L·K, PEFT's layout:
    per token layer 0's keys, its values, layer 1's keys ...) is the cache the call starts from, as PEFT hands it to
    the model: model.onnx takes no prefix input. Without one, an empty cache."""
    graph = set(manifest.graphs["infer"].inputs)
    prefix = {split_slot_name(n)[1]: t for n, t in slots.items() if n not in graph}
    rest = {n: t for n, t in slots.items() if n in graph}
    if not prefix or not specs:
        return empty_cache(specs, batch), rest
    p = owner(next(iter(prefix))).to_peft_prompt(prefix)  # (V, 2·L·K), the projection run where the bundle has one
    v = p.shape[0]
    p = p.reshape(v, len(specs), specs[0].heads, specs[0].head_dim)  # specs run layer by layer, key then value
    cache = {s.past: np.ascontiguousarray(np.broadcast_to(p[:, j].transpose(1, 0, 2)[None], (batch, s.heads, v, s.head_dim)),
                                          np.float32) for j, s in enumerate(specs)}
    return cache, rest


def next_cache(specs: list[CacheSpec], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The cache feeds of the next call: this call's present outputs under the past input names."""
    return {s.past: outputs[s.present] for s in specs}


def cache_bytes(cache: dict[str, np.ndarray]) -> int:
    """Bytes the cache holds (it grows by 2 x layers x heads x head_dim x 4 bytes a token)."""
    return sum(int(v.nbytes) for v in cache.values())
