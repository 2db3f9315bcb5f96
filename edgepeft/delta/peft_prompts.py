"""Prompt tuning, P-tuning and prefix tuning deltas to and from a PEFT prompt-learning adapter (numpy only).

PEFT stores one tensor, ``prompt_embeddings``: what the model sees (V, H), or the prefix (V, 2·L·K);
where the bundle trains an encoder, to-peft runs it (``VirtualTokens.to_peft_prompt``) and from-peft
refuses, since the encoder cannot be recovered from its output. A classifier head is PEFT's whole
``modules_to_save`` copy: ``base_model.<module>.weight`` = base + delta.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft import atomic, methods
from edgepeft.delta import safeio
from edgepeft.delta.format import Delta, DeltaMeta, check_against_manifest, check_structure
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest
from edgepeft.methods.virtual import VirtualTokens
from edgepeft.names import BIAS, CAUSAL_LM, SEQ_CLS, WEIGHT, slot_name, split_slot_name

CONFIG_FILE, WEIGHTS_FILE, KEY = "adapter_config.json", "adapter_model.safetensors", "prompt_embeddings"
PREFIX = "base_model."  # a prompt-learning PeftModel's base_model is the HF model itself
TASK_TYPES = {SEQ_CLS: "SEQ_CLS", CAUSAL_LM: "CAUSAL_LM"}


def prompt_method(kinds) -> VirtualTokens | None:
    """The virtual-token method among the owners of ``kinds``, if any."""
    found = {m for k in kinds if (m := methods.owner(k)).virtual}
    return found.pop() if len(found) == 1 else None


def _split(manifest: Manifest, tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """(the prompt method's tensors by kind, the head's tensors by module and kind); anything else is refused."""
    prompt, heads, other = {}, {}, []
    for name, t in tensors.items():
        module, kind = split_slot_name(name)
        if methods.owner(kind).virtual:
            prompt[kind] = t
        elif kind in (WEIGHT, BIAS) and any(s.module == module and s.kind == WEIGHT for s in manifest.slots):
            heads.setdefault(module, {})[kind] = t
        else:
            other.append(name)
    if other:
        raise DeltaError(f"to_peft: slot(s) with no PEFT prompt-learning equivalent: {', '.join(sorted(other)[:6])} "
                         "(PEFT loads one method per adapter); export the bundle with the prompt method alone")
    return prompt, heads


def _base(base_weights: dict[str, np.ndarray] | None, key: str, where: str) -> np.ndarray:
    if base_weights is None or key not in base_weights:
        raise DeltaError(f"{where}: {key!r} is stored whole by PEFT (the classifier's modules_to_save copy), so converting it "
                         "needs the base weights: give a bundle with its weights file (CLI --bundle)")
    return np.asarray(base_weights[key], np.float32)


def to_peft_prompt(delta: Delta, manifest: Manifest, out_dir: str | os.PathLike, method: VirtualTokens, *,
                   base_weights: dict[str, np.ndarray] | None = None) -> None:
    """Write ``delta`` as PEFT's adapter of ``method`` (adapter_config.json + adapter_model.safetensors)."""
    where = "to_peft"
    prompt, heads = _split(manifest, delta.tensors)
    out = {KEY: method.to_peft_prompt(prompt)}
    for module, t in sorted(heads.items()):
        for kind in (WEIGHT, BIAS):
            base = _base(base_weights, f"{module}.{kind}", where)
            out[f"{PREFIX}{module}.{kind}"] = base + t[kind] if kind in t else base
    layers, kv_heads, head_dim = manifest.extra["kv_shape"]
    prefix = method.virtual == "prefix"
    hidden = int(prompt[method.token_kind].shape[1]) if not prefix else kv_heads * head_dim
    config: dict[str, Any] = {
        "peft_type": method.peft_type, "task_type": TASK_TYPES[manifest.task], "base_model_name_or_path": manifest.source,
        "num_virtual_tokens": int(out[KEY].shape[0]), "num_transformer_submodules": 1, "num_layers": int(layers),
        # PEFT's prefix layout counts key/value heads (grouped-query attention), its prompt the hidden size
        "token_dim": hidden if not prefix else kv_heads * head_dim,
        "num_attention_heads": int(kv_heads), "inference_mode": True,
        "modules_to_save": sorted(heads) or None,
        **method.peft_prompt_config(manifest.method_config.get(method.name, {}), prompt),
    }
    if config.get("encoder_hidden_size") is None and "encoder_hidden_size" in config:
        config["encoder_hidden_size"] = hidden
    d = Path(os.fspath(out_dir))
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
    atomic.write_bytes(d / WEIGHTS_FILE, safeio.save(arrays, {"format": "pt"}))
    atomic.write_text(d / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")


def from_peft_prompt(config: dict[str, Any], weights: dict[str, np.ndarray], manifest: Manifest, method: VirtualTokens,
                     where: str, *, base_weights: dict[str, np.ndarray] | None = None, adapter: str = "default") -> Delta:
    """A delta for ``manifest`` from PEFT's prompt-learning adapter (config and tensors already read)."""
    if config.get("peft_type") != method.peft_type:
        raise DeltaError(f"{where}: peft_type is {config.get('peft_type')!r}; the bundle's {method.name} slots take {method.peft_type!r}")
    if KEY not in weights:
        raise DeltaError(f"{where}: no {KEY!r} tensor; not a {method.peft_type} adapter")
    shapes = {s.kind: s.shape for s in manifest.slots if methods.owner(s.kind) is method}
    got = {slot_name(s.module, k): v for k, v in method.from_peft_prompt(weights[KEY], shapes, where).items()
           for s in manifest.slots if s.kind == k}
    stray = []
    for key, value in sorted(weights.items()):
        if key == KEY:
            continue
        module, _, kind = key.removeprefix(PREFIX).rpartition(".")
        module = module.removesuffix(".modules_to_save")
        if slot_name(module, WEIGHT) in {s.name for s in manifest.slots} and kind in (WEIGHT, BIAS):
            got[slot_name(module, kind)] = value.astype(np.float32) - _base(base_weights, f"{module}.{kind}", where)
        else:
            stray.append(key)
    if stray:
        raise DeltaError(f"{where}: adapter tensor(s) with no slot in the bundle: {', '.join(stray[:6])}")
    delta = Delta(got, DeltaMeta(base_fingerprint=manifest.fingerprint, method=manifest.method, rank=0, alpha=0.0,
                                 adapter=adapter, creator="peft"))
    check_structure(delta, where)
    check_against_manifest(delta, manifest, where)
    return delta
