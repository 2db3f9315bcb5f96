"""Convert deltas to and from a Hugging Face PEFT LoRA adapter directory, with numpy only (no peft import).

Mapping (PEFT keys carry the ``base_model.model.`` prefix; PEFT's saved files drop the adapter name):

- ``<m>.lora_A`` (r, in) / ``<m>.lora_B`` (out, r)  <->  ``<m>.lora_A.weight`` / ``<m>.lora_B.weight``
- ``<m>.bias`` on a LoRA module  <->  ``<m>.lora_B.bias`` with ``lora_bias: true``. PEFT adds
  ``scaling * lora_B.bias``, so the file holds bias / scale.
- head modules (a ``<m>.weight`` slot, e.g. the classifier)  <->  ``modules_to_save``: PEFT stores the
  FULL module (``<m>.weight``, ``<m>.bias``), so converting needs the base weights (base + delta out,
  full - base in).
- other methods map their slots through the method's ``peft_keys`` (IA3's ``ia3_l``, DoRA's
  ``lora_magnitude_vector``, VeRA's ``vera_lambda_d`` / ``vera_lambda_b``); VeRA's shared frozen
  projections travel as ``base_model.vera_A`` / ``vera_B`` (``save_projection``), taken from the bundle
  and, reading, required to equal the bundle's.
- BitFit bias slots on modules without LoRA (``attention.output.dense.bias``, ...)  <->  PEFT's
  ``bias: "all"``, which stores biases whole: ``<m>.bias`` (``<m>.base_layer.bias`` on a LoRA module)
  = base + delta. Needs the base weights too; in this mode every bias slot is written that way.

Convolutional bundles (edgepeft/delta/peft_conv.py): LoRA on a Conv2d is PEFT's lora.Conv2d (4-D A and B),
BatchNorm tuning rides as modules_to_save (norms stored whole, running statistics the bundle's); ``task_type``
is null, as PEFT has none for a custom image or audio model.

What cannot map: a module with both LoRA and a full weight slot (PEFT wraps a module one way), and,
reading, a PEFT adapter whose ``bias: "all"`` training changed biases the bundle has no slot for
(LayerNorm biases, say). Also note: PEFT trains every bias of the model under ``bias: "all"``, more
than the bundle's BitFit slots, so training on in PEFT after ``to-peft`` is a wider method; the
logits of the converted adapter are the same. Each refusal is a DeltaError naming the tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgepeft import atomic, frozen, methods
from edgepeft.delta import peft_conv, safeio
from edgepeft.delta.format import Delta, DeltaMeta, check_against_manifest, check_structure
from edgepeft.delta.peft_prompts import from_peft_prompt, prompt_method, to_peft_prompt
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest
from edgepeft.names import (AUDIO_CLS, BIAS, BN_SCALE, CAUSAL_LM, IMAGE_CLS, LORA_A, SEQ_CLS, TOKEN_CLS, WEIGHT, slot_name,
                            split_slot_name)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {SEQ_CLS: "SEQ_CLS", TOKEN_CLS: "TOKEN_CLS", CAUSAL_LM: "CAUSAL_LM", IMAGE_CLS: None, AUDIO_CLS: None}
MAX_CONFIG_BYTES = 1024 * 1024

_LORA_KEY = re.compile(r"^(?P<m>.+)\.(?P<ab>lora_A|lora_B)(?:\.[^.]+)?\.(?P<p>weight|bias)$")
_ADAPTER_INFIX = re.compile(r"^(.+\.(?:lora_A|lora_B))\.[^.]+(?=\.weight$)")
_FULL_KEY = re.compile(r"^(?P<m>.+?)(?:\.modules_to_save(?:\.[^.]+)?)?\.(?P<p>weight|bias)$")


def _modules(delta: Delta) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for n in delta.tensors:
        m, kind = split_slot_name(n)
        out.setdefault(m, set()).add(kind)
    return out


def _unmappable(kinds_by_module: dict[str, set[str]], adapted: set[str]) -> list[str]:
    bad = []
    for m, kinds in sorted(kinds_by_module.items()):
        if m in adapted and WEIGHT in kinds:
            bad += [slot_name(m, k) for k in sorted(kinds)]
    return bad


def _refuse_unmappable(bad: list[str], where: str, method: methods.Method) -> None:
    if bad:
        label = "LoRA" if method.peft_type == "LORA" else method.peft_type
        raise DeltaError(
            f"{where}: slot(s) with no PEFT {label} equivalent: {', '.join(bad)} "
            "(PEFT wraps a module either with its method or as a full modules_to_save copy, not both)"
        )


def _peft_method(kinds: Iterable[str], where: str) -> methods.Method:
    """The PEFT method slots of ``kinds`` convert as: the one of their methods PEFT has (riders: BitFit, the head)."""
    used = {methods.owner(k) for k in kinds}
    own = sorted((m for m in used if m.peft_type), key=lambda m: m.name)
    if not own and BN_SCALE in {k for m in used for k in m.kinds}:
        raise DeltaError(f"{where}: PEFT has no BatchNorm-tuning method: it carries BatchNorm γ and β only as modules_to_save "
                         "beside a method that adapts modules; export the bundle with --method lora+bn+head to convert, "
                         "or keep the delta in edgepeft form")
    if not own:
        raise DeltaError(f"{where}: a {'+'.join(sorted(m.name for m in used))} delta has no PEFT adapter equivalent: PEFT needs a method "
                         f"that adapts modules ({', '.join(n for n in methods.names() if methods.get(n).peft_type)}); "
                         "export the bundle with one of those, or keep the delta in edgepeft form")
    if len(own) > 1:
        raise DeltaError(f"{where}: {'+'.join(m.name for m in own)} deltas do not convert to one PEFT adapter; PEFT loads one method per adapter")
    return own[0]


def _module_weight(base_weights: dict[str, np.ndarray] | None, manifest: Manifest, method: methods.Method,
                   module: str, where: str) -> np.ndarray | None:
    """The module's frozen (out, in) weight for a method whose PEFT values depend on it (DoRA's magnitude)."""
    if not method.needs_base:
        return None
    _base(base_weights, f"{module}.weight", None, where)  # refuses without base weights, naming the key
    return frozen.base_weights(base_weights or {}, manifest)(module)


def _base(base_weights: dict[str, np.ndarray] | None, key: str, shape: tuple[int, ...] | None, where: str) -> np.ndarray:
    if base_weights is None:
        raise DeltaError(
            f"{where}: {key!r} is stored whole by PEFT (a modules_to_save head, or a bias under bias='all'), "
            "so converting it needs the base weights: give a bundle with its weights file (CLI --bundle), or "
            "base_weights={'<module>.weight': array, ...} from Python"
        )
    if key not in base_weights:
        raise DeltaError(f"{where}: base_weights lacks {key!r}")
    w = np.asarray(base_weights[key], dtype=np.float32)
    if shape is not None and w.shape != shape:
        raise DeltaError(f"{where}: base weight {key!r} has shape {w.shape}, the slot needs {shape}")
    return w


def _equals_base(base_weights: dict[str, np.ndarray] | None, key: str, value: np.ndarray) -> bool:
    return base_weights is not None and key in base_weights and np.array_equal(np.asarray(base_weights[key], dtype=np.float32), value)


def to_peft(
    delta: Delta,
    manifest: Manifest,
    out_dir: str | os.PathLike,
    *,
    base_weights: dict[str, np.ndarray] | None = None,
) -> None:
    """Write ``delta`` as a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    where = "to_peft"
    check_structure(delta, where)
    check_against_manifest(delta, manifest, where)
    prompt = prompt_method(split_slot_name(n)[1] for n in delta.tensors)
    if prompt is not None:  # prompt tuning, P-tuning, prefix tuning: PEFT's prompt-learning form (peft_prompts.py)
        return to_peft_prompt(delta, manifest, out_dir, prompt, base_weights=base_weights)
    method = _peft_method((split_slot_name(n)[1] for n in delta.tensors), where)
    kinds = _modules(delta)
    adapted = sorted(m for m, k in kinds.items() if k & set(method.peft_keys))
    _refuse_unmappable(_unmappable(kinds, set(adapted)), where, method)
    if manifest.task not in TASK_TYPES:
        raise DeltaError(f"{where}: task {manifest.task!r} has no PEFT task_type")
    lora_family = method.peft_type == "LORA"
    heads = sorted(m for m, k in kinds.items() if WEIGHT in k)
    norms = sorted(m for m, k in kinds.items() if BN_SCALE in k)  # BatchNorm tuning: modules_to_save, stored whole
    bitfit = sorted(m for m, k in kinds.items() if BIAS in k and m not in adapted and WEIGHT not in k and m not in norms)
    if not lora_family and (bitfit or any(BIAS in kinds[m] for m in adapted)):
        raise DeltaError(f"{where}: PEFT's {method.peft_type} adapter has no bias option, so the {method.name} delta's "
                         "BitFit bias slots cannot be written; export the bundle without bitfit to convert")
    bias_all = bool(bitfit)  # biases beyond adapted modules: PEFT's bias="all", which stores them whole
    lora_bias = lora_family and not bias_all and any(BIAS in kinds[m] for m in adapted)
    scale = delta.scale
    if lora_bias and scale == 0:
        raise DeltaError(f"{where}: LoRA alpha is 0, so PEFT's lora_B.bias (scaled by alpha/r) cannot carry a bias delta")
    t = delta.tensors
    out: dict[str, np.ndarray] = {}
    if bias_all:
        for m in sorted(set(bitfit) | {m for m in adapted if BIAS in kinds[m]}):
            b = t[slot_name(m, BIAS)]
            key = f"{m}.base_layer.bias" if m in adapted else f"{m}.bias"
            out[PREFIX + key] = _base(base_weights, f"{m}.bias", b.shape, where) + b
    cnn = manifest.task in (IMAGE_CLS, AUDIO_CLS)
    for m in adapted:
        weight = None if cnn else _module_weight(base_weights, manifest, method, m, where)
        kernel = peft_conv.conv_kernel(base_weights, m, where) if cnn else None
        for kind in sorted(kinds[m] & set(method.peft_keys)):
            v = method.to_peft(kind, t[slot_name(m, kind)], weight)
            out[f"{PREFIX}{m}.{method.peft_keys[kind]}"] = peft_conv.lora_to_conv(kind == LORA_A, v, kernel) if kernel else v
        if lora_bias:  # PEFT gives every target a lora_B bias once lora_bias is on; zero where we have none
            b = t.get(slot_name(m, BIAS))
            rows = out[f"{PREFIX}{m}.lora_B.weight"].shape[0]
            out[f"{PREFIX}{m}.lora_B.bias"] = (b / scale if b is not None else np.zeros(rows)).astype(np.float32)
    for name in method.peft_shared:  # frozen tensors PEFT keeps in the adapter file (VeRA's shared projections)
        out[f"base_model.{name}"] = _base(base_weights, name, None, where)
    for m in norms:  # γ + Δγ, β + Δβ, and the running statistics as the bundle keeps them (frozen)
        out[f"{PREFIX}{m}.weight"] = _base(base_weights, f"{m}.weight", t[slot_name(m, BN_SCALE)].shape, where) + t[slot_name(m, BN_SCALE)]
        b = t.get(slot_name(m, BIAS))
        out[f"{PREFIX}{m}.bias"] = _base(base_weights, f"{m}.bias", None, where) + (b if b is not None else 0)
        out.update({f"{PREFIX}{m}.{k}": v for k, v in peft_conv.norm_buffers(base_weights or {}, m, where).items()})
    for m in heads:
        w = t[slot_name(m, WEIGHT)]
        out[f"{PREFIX}{m}.weight"] = _base(base_weights, f"{m}.weight", w.shape, where) + w
        b = t.get(slot_name(m, BIAS))
        if b is not None:
            out[f"{PREFIX}{m}.bias"] = _base(base_weights, f"{m}.bias", b.shape, where) + b
        elif base_weights is not None and f"{m}.bias" in base_weights:
            out[f"{PREFIX}{m}.bias"] = _base(base_weights, f"{m}.bias", None, where)
    mine = {m: kinds[m] & set(method.peft_keys) for m in adapted}
    common = {
        "peft_type": method.peft_type,
        "task_type": TASK_TYPES[manifest.task],
        "base_model_name_or_path": manifest.source,
        # exact module paths, not leaf names: leaf names would also wrap modules the bundle does not train
        "target_modules": adapted,
        "modules_to_save": sorted(_saved_modules(heads) + norms) or None,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if lora_family:
        alpha = delta.meta.alpha
        config = {**common, "r": delta.meta.rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
                  "bias": "all" if bias_all else "none", "lora_bias": lora_bias, "lora_dropout": 0.0, "use_rslora": False,
                  "use_dora": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}
    else:
        config = dict(common)
    own_tensors = {m: {k: t[slot_name(m, k)] for k in mine[m]} for m in adapted}
    config.update(method.peft_fields(own_tensors, manifest.method_config.get(method.name, {})))
    out_dir = Path(os.fspath(out_dir))
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
    atomic.write_bytes(out_dir / WEIGHTS_FILE, safeio.save(tensors, {"format": "pt"}))
    atomic.write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")


# PEFT adds its classifier names to modules_to_save and keeps that whole module: a head inside one (RoBERTa's and
# ELECTRA's classifier.dense / classifier.out_proj) is saved under it, or PEFT finds the same weights twice.
PEFT_HEAD_NAMES = ("classifier", "score")


def _saved_modules(heads: list[str]) -> list[str]:
    """modules_to_save for these head modules: each, or the PEFT-kept classifier it sits in."""
    return sorted({next((h for h in PEFT_HEAD_NAMES if m.startswith(h + ".")), m) for m in heads})


def _load_config(path: Path) -> Any:
    """The parsed adapter_config.json, refused in one line when missing, oversized or not JSON."""
    if not path.is_file():
        raise DeltaError(f"{path}: missing; is {path.parent} a PEFT adapter directory?")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise DeltaError(f"{path.name}: larger than {MAX_CONFIG_BYTES} bytes; not an adapter config")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DeltaError(f"{path.name}: not valid JSON ({e})") from None


def _read_config(path: Path, method: methods.Method, options: dict[str, Any]) -> tuple[int, float]:
    """(r, alpha in our convention: the update is alpha / r * B @ A; 0, 0 for methods without a rank) from a
    PEFT adapter config, which must be of ``method`` (the bundle's PEFT method, with its recorded ``options``)."""
    where = path.name
    cfg = _load_config(path)
    got = cfg.get("peft_type") if isinstance(cfg, dict) else None
    if got != method.peft_type:
        raise DeltaError(f"{where}: peft_type is {got!r}; the bundle's {method.name} slots take {method.peft_type!r}")
    method.check_peft_config(cfg, options, where)
    want_dora = bool(method.peft_config({}, options).get("use_dora", False))
    if method.peft_type == "LORA" and bool(cfg.get("use_dora")) != want_dora:
        raise DeltaError(f"{where}: 'use_dora' is {bool(cfg.get('use_dora'))}; the bundle's {method.name} slots need "
                         f"{want_dora} (export the bundle with --method {'dora' if cfg.get('use_dora') else 'lora'})")
    if method.peft_type != "LORA" and not method.peft_rank:
        return 0, 0.0
    rank_key = method.peft_rank or "r"  # AdaLoRA: init_r, the scale's denominator; its rank_pattern is in the shapes
    r, alpha = cfg.get(rank_key), cfg.get("lora_alpha")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise DeltaError(f"{where}: '{rank_key}' is {r!r}; expected a positive integer")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
        raise DeltaError(f"{where}: 'lora_alpha' is {alpha!r}; expected a number")
    for key in ("alpha_pattern",) if method.peft_rank else ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise DeltaError(f"{where}: '{key}' is set; edgepeft deltas have one rank and scale")
    if cfg.get("use_rslora"):  # PEFT scales by alpha/sqrt(r); keep the same update with our alpha/r
        alpha = alpha * math.sqrt(r)
    return r, float(alpha)


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        if path.with_name("adapter_model.bin").is_file():
            raise DeltaError(f"{path.parent}: holds adapter_model.bin (pickle), which edgepeft does not read; re-save with safe_serialization=True")
        raise DeltaError(f"{path}: missing; is {path.parent} a PEFT adapter directory?")
    data = path.read_bytes()
    header = safeio.parse_header(data, path.name, dtypes=("F32", "F16", "BF16", "F64", "I64"))  # I64: BatchNorm counters
    return safeio.read_arrays(data, header)


def from_peft(
    adapter_dir: str | os.PathLike,
    manifest: Manifest,
    *,
    base_weights: dict[str, np.ndarray] | None = None,
    fill_missing: bool = False,
    adapter: str = "default",
) -> Delta:
    """Read a PEFT LoRA adapter directory into a Delta that fits ``manifest`` (checked like load_delta)."""
    d = Path(os.fspath(adapter_dir))
    where = d.name or str(d)
    prompt = prompt_method(sl.kind for sl in manifest.slots)
    if prompt is not None:
        cfg = _load_config(d / CONFIG_FILE)
        return from_peft_prompt(cfg if isinstance(cfg, dict) else {}, _read_weights(d / WEIGHTS_FILE), manifest, prompt,
                                where, base_weights=base_weights, adapter=adapter)
    method = _peft_method((sl.kind for sl in manifest.slots), where)
    r, alpha = _read_config(d / CONFIG_FILE, method, manifest.method_config.get(method.name, {}))
    scale = alpha / r if r else 1.0
    want = {s.name: s for s in manifest.slots}
    own = {f"{s.module}.{method.peft_keys[s.kind]}": s for s in manifest.slots if s.kind in method.peft_keys}
    got: dict[str, np.ndarray] = {}
    stray: list[str] = []

    def put(slot: str, value: np.ndarray, key: str) -> None:
        if slot in got and np.array_equal(got[slot], value.astype(np.float32)):
            return  # PEFT's bias="all" saves a head bias twice (<m>.bias and <m>.modules_to_save.bias)
        if slot in got:
            raise DeltaError(f"{where}: {key!r} maps to slot {slot!r} a second time (several adapters in one file?)")
        got[slot] = value.astype(np.float32)

    shared = {f"base_model.{name}": name for name in method.peft_shared}
    for key, value in sorted(_read_weights(d / WEIGHTS_FILE).items()):
        if key in shared:  # must be the bundle's own: the slots mean nothing with other projections
            if not _equals_base(base_weights, shared[key], value.astype(np.float32)):
                raise DeltaError(f"{where}: {key!r} is not the bundle's {shared[key]} ({'no base weights given' if base_weights is None else 'another seed or rank'}); "
                                 "the adapter was made with other shared projections")
            continue
        k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        plain = _ADAPTER_INFIX.sub(r"\1", k)  # <m>.lora_A.<adapter>.weight -> <m>.lora_A.weight
        if plain in own:
            sl = own[plain]
            weight = None if value.ndim == 4 else _module_weight(base_weights, manifest, method, sl.module, where)
            put(sl.name, method.from_peft(sl.kind, peft_conv.flatten_conv(value), weight, sl.shape), key)
        elif mt := _LORA_KEY.match(k):
            m, ab, p = mt["m"], mt["ab"], mt["p"]
            if p == "bias" and ab == "lora_B" and slot_name(m, BIAS) in want:
                put(slot_name(m, BIAS), value * scale, key)
            elif p == "weight" or np.any(value):  # a zero lora bias is what PEFT writes for untrained targets
                stray.append(key)
        elif mt := peft_conv.BUFFERS.match(k):  # a modules_to_save BatchNorm's running statistics: the bundle's
            peft_conv.check_buffer(base_weights, mt["m"].removesuffix(".original_module"), mt["p"], value, where, key)
        elif mt := _FULL_KEY.match(k):  # a whole tensor: a modules_to_save head or norm, or a bias under bias="all"
            m, p = mt["m"].removesuffix(".base_layer"), mt["p"]
            if m.endswith(".original_module"):  # PEFT's untouched copy of a modules_to_save module
                if not _equals_base(base_weights, f"{m.removesuffix('.original_module')}.{p}", value):
                    stray.append(key)
            elif p == WEIGHT and slot_name(m, BN_SCALE) in want:  # a tuned norm's γ, stored whole
                put(slot_name(m, BN_SCALE), value - _base(base_weights, f"{m}.weight", value.shape, where), key)
            elif slot_name(m, p) in want:
                put(slot_name(m, p), value - _base(base_weights, f"{m}.{p}", value.shape, where), key)
            elif not _equals_base(base_weights, f"{m}.{p}", value):
                stray.append(key)  # a tensor the bundle has no slot for and that differs from the base
        else:
            stray.append(key)
    if stray:
        raise DeltaError(f"{where}: adapter tensor(s) with no slot in the bundle: {', '.join(stray[:6])}" + (" ..." if len(stray) > 6 else ""))
    missing = sorted(set(want) - set(got))
    if missing and not fill_missing:
        raise DeltaError(
            f"{where}: adapter has nothing for bundle slot(s) {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; "
            "pass fill_missing=True (CLI: --fill-missing) to treat them as zero"
        )
    for name in missing:  # each slot's neutral value (LoRA-family pairs at the adapter's rank)
        s = want[name]
        owner = methods.owner(s.kind)
        axis = owner.infer_axis(s.kind)
        shape = tuple(r if i == axis else n for i, n in enumerate(s.shape))
        got[name] = np.full(shape, owner.fill(s.kind), dtype=np.float32)
    meta = DeltaMeta(base_fingerprint=manifest.fingerprint, method=manifest.method, rank=r, alpha=alpha, adapter=adapter, creator="peft")
    delta = Delta(got, meta)
    check_structure(delta, where)
    check_against_manifest(delta, manifest, where)
    return delta
