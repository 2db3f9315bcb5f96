"""``export_bundle`` for a plain ``torch.nn.Module`` of convolutions: an image or audio classifier in, a bundle out.

Any module built of the layer kinds in ``KNOWN_LAYERS`` (Conv2d, BatchNorm2d, Linear, activations,
pooling, padding, flatten, dropout) exports; a layer of another kind is refused by name before anything
is traced or written. The input is one (B, C, H, W) float tensor with a dynamic batch (normalized pixels, or
log-mel features (B, 1, mels, frames) for an audio bundle, which runtime/audio.py computes on the device, or a
waveform bundle's raw samples (B, 1, samples, 1)); the classifier
(``head``) is replaced by a fresh, seeded Linear over the bundle's labels (or kept: ``keep_head``). Delta methods: ``lora`` (PEFT's
lora.Conv2d on convolutions), ``bitfit`` (conv biases, BatchNorm shifts), ``bn`` (BatchNorm affine with
frozen running statistics) and ``head``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.export import Dim
from torch.func import functional_call

from edgepeft import atomic, methods
from edgepeft.errors import ExportError
from edgepeft.manifest import Graph, Manifest, Slot, neutral_values, write_manifest
from edgepeft.names import (AUDIO_CLS, CNN_INPUTS, IMAGE_CLS, INFER_GRAPH_FILE, LABELS, LOGITS, LOSS, TRAIN_GRAPH_FILE,
                            WEIGHTS_FILE, frozen_name, grad_name)
from edgepeft.exporters.inject import DeltaFeed, canonical_param, inject, resolve_top_layers
from edgepeft.exporters.trace import _export, classification_loss
from edgepeft.exporters.weights import QuantSpec, add_input_defaults, load_params, save_bundle_graphs

KNOWN_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.BatchNorm2d, nn.Linear,
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d,
    nn.Flatten, nn.Identity, nn.Dropout,
)
CONV_METHODS = ("lora", "bitfit", "bn", "head")  # the registered methods with a torch half for convolutions
QUANTIZATIONS = ("none", "int8")


def check_layers(module: nn.Module) -> None:
    """Refuse (naming the first) a layer the exporter does not know: a leaf of another kind, or a container with weights of its own."""
    for name, mod in module.named_modules():
        own = list(mod.named_parameters(recurse=False))
        leaf = not any(True for _ in mod.children())
        if isinstance(mod, KNOWN_LAYERS) or (not leaf and not own):
            continue
        # A weightless re-implementation of a known kind (EfficientNet's own Identity) is traced as what it computes.
        if leaf and not own and not list(mod.buffers()) and type(mod).__name__ in {k.__name__ for k in KNOWN_LAYERS}:
            continue
        kinds = ", ".join(sorted({k.__name__ for k in KNOWN_LAYERS}))
        raise ExportError(f"layer {name or '(root)'!r} is a {type(mod).__name__}, which the convolutional exporter does "
                          f"not know; it knows {kinds} (and containers of them)")


def layer_stack(module: nn.Module, layer_regex: str | None) -> tuple[str, Callable[[str], int | None]]:
    """(regex, index-of) for the model's stack of layers: ``layer_regex`` or the longest Sequential/ModuleList."""
    if layer_regex is None:
        lists = [(len(m), n) for n, m in module.named_modules() if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m)]
        if not lists:
            layer_regex = r"^$"
        else:
            _, path = max(lists)
            layer_regex = (r"^" + re.escape(path) + r"\.(\d+)(\.|$)") if path else r"^(\d+)(\.|$)"
    rx = re.compile(layer_regex)

    def index(name: str) -> int | None:
        m = rx.search(name)
        return int(m.group(1)) if m else None

    return layer_regex, index


def model_view(module: nn.Module, index: Callable[[str], int | None], top_layers: int | str | None,
               defaults: Mapping[str, tuple[str, ...]]) -> tuple[methods.ModelView, tuple[int, ...]]:
    """What the methods see, and the trained layers: the last ``top_layers`` layers and every module after them."""
    names = [n for n, _ in module.named_modules()]
    layers = sorted({i for n in names if (i := index(n)) is not None})
    top_layers = resolve_top_layers(len(layers), top_layers) if layers else None  # "auto": the top third, at least 2
    kept = tuple(layers[-top_layers:]) if top_layers and layers else tuple(layers)
    first = min((k for k, n in enumerate(names) if index(n) in kept[:1]), default=0) if top_layers and kept else 0
    order = {n: k for k, n in enumerate(names)}
    linears, norms, groups, no_bias = {}, {}, {}, set()
    for n, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            linears[n] = (m.in_channels // m.groups * kh * kw, m.out_channels)
            if m.groups > 1:
                groups[n] = m.groups
        elif isinstance(m, nn.Linear):
            linears[n] = (m.in_features, m.out_features)
        elif isinstance(m, nn.BatchNorm2d):
            norms[n] = m.num_features
        if (isinstance(m, (nn.Conv2d, nn.Linear))) and m.bias is None:
            no_bias.add(n)
    view = methods.ModelView(linears, lambda n: order[n] >= first, defaults, True, norms=norms, groups=groups,
                             no_bias=frozenset(no_bias))
    return view, (kept if top_layers else ())


def _set_head(module: nn.Module, head: str, n_labels: int, keep: bool) -> None:
    """Replace the final Linear by a fresh one over ``n_labels`` (``keep``: keep the trained one, which must fit)."""
    parent_path, _, leaf = head.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    old = getattr(parent, leaf, None)
    if not isinstance(old, nn.Linear):
        raise ExportError(f"head {head!r}: expected the model's final nn.Linear, found {type(old).__name__}")
    if keep and old.out_features != n_labels:
        raise ExportError(f"head {head!r} has {old.out_features} outputs for {n_labels} labels; keep_head needs one per label")
    if not keep:
        setattr(parent, leaf, nn.Linear(old.in_features, n_labels))


def _functions(model: nn.Module, feed: DeltaFeed, slots: Sequence[Slot], param_names: list[str]):
    names, n = [s.name for s in slots], len(slots)

    def run(pixels: torch.Tensor, rest: tuple) -> torch.Tensor:
        feed.tensors = dict(zip(names, rest[:n]))
        return functional_call(model, dict(zip(param_names, rest[n:])), (pixels,))

    def infer(pixels, *rest):
        return run(pixels, rest)

    def train(pixels, labels, *rest):
        loss = classification_loss(run(pixels, rest), labels)
        return (loss, *torch.autograd.grad(loss, rest[:n]))

    return infer, train


def export_bundle(
    module: nn.Module,
    example_input: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[str],
    head: str,
    method: str = "lora",
    method_config: Mapping[str, Any] | None = None,
    top_layers: int | str | None = None,
    layer_regex: str | None = None,
    defaults: Mapping[str, tuple[str, ...]] | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    quantize: str = "int8",
    source: str = "",
    opset: int = 20,
    seed: int = 0,
    keep_head: bool = False,
    task: str = IMAGE_CLS,
    audio: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] = lambda msg: None,
) -> Manifest:
    """Export ``module`` (an image classifier over ``example_input``'s (C, H, W)) to a bundle in ``out_dir``.

    ``head``: path of its final Linear, replaced by a fresh one over ``labels``; ``top_layers``: slots only
    in the last N layers of the stack (``layer_regex``, default the longest Sequential/ModuleList) and after
    it, so the backward pass stops there (None or "all": everywhere, "auto": the top third); ``defaults``: method option defaults such as
    ``{"lora.targets": (...)}`` (LoRA's default: every ungrouped convolution in scope); ``mean``/``std``:
    the per-channel normalization of pixels in [0, 1] the device applies. ``task``: IMAGE_CLS, or AUDIO_CLS with
    ``audio`` the features' runtime.audio.AudioSpec fields (example input (1, 1, mels, frames)). The module is
    changed in place. ``keep_head``: keep the model's trained classifier (its outputs are ``labels``, in order)
    instead of a fresh one, so the bundle starts where the model is (personalizing a model, not re-purposing it).
    """
    out_dir = Path(os.fspath(out_dir))
    t0 = time.perf_counter()
    say = lambda msg: progress(f"[{time.perf_counter() - t0:6.1f}s] {msg}")  # noqa: E731
    if out_dir.exists():
        raise ExportError(f"{out_dir}: already exists; remove it or choose another output directory")
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"quantization {quantize!r}: a convolutional bundle takes {', '.join(QUANTIZATIONS)}")
    if example_input.dim() != 4:
        raise ExportError(f"example input of shape {tuple(example_input.shape)}: expected (batch, channels, height, width)")
    if task not in CNN_INPUTS or (audio is None) != (task != AUDIO_CLS):
        raise ExportError(f"task {task!r}: a convolutional bundle is one of {', '.join(CNN_INPUTS)}; audio features "
                          "(audio=...) go with audio-classification and only with it")
    extra = _input_extra(task, example_input, mean, std, audio)
    labels = list(labels)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ExportError(f"labels {labels}: a classifier needs at least 2 distinct labels")
    chosen = methods.parse(method)
    if bad := [m.name for m in chosen if m.name not in CONV_METHODS]:
        raise ExportError(f"method {bad[0]!r} does not support convolutional models; choose from {', '.join(CONV_METHODS)}")
    configs = methods.configs(chosen, dict(method_config or {}))
    check_layers(module)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)  # the fresh head is initialized here: seeded, so exports repeat
    _set_head(module, head, len(labels), keep_head)
    module.eval()
    regex, index = layer_stack(module, layer_regex)
    chosen_defaults = dict(defaults or {})
    view, kept = model_view(module, index, top_layers, chosen_defaults)
    if "lora.targets" not in chosen_defaults:  # every ungrouped convolution in scope
        convs = tuple(n for n in view.linears if n != head and n not in view.groups and view.in_scope(n)
                      and isinstance(module.get_submodule(n), nn.Conv2d))
        view = methods.ModelView(view.linears, view.in_scope, {**chosen_defaults, "lora.targets": convs}, True,
                                 norms=view.norms, groups=view.groups, no_bias=view.no_bias)
    view = methods.ModelView(view.linears, view.in_scope, {**view.defaults, "head.modules": (head,)}, True,
                             norms=view.norms, groups=view.groups, no_bias=view.no_bias)
    auto = tuple(m for m in methods.get_all() if task in m.auto_tasks and m not in chosen)
    planned: dict[str, Slot] = {}
    for m in chosen + auto:
        for s in m.plan(view, configs.get(m.name) or m.config_cls()):
            planned.setdefault(s.name, s)
    slots = sorted(planned.values(), key=lambda s: s.name)
    # depthwise (grouped) kernels stay fp32: they are few weights (5 % of EfficientNet-Lite0's), and onnxruntime's
    # fast depthwise kernel needs a constant weight (a dequantized one ran its generic per-group path, 10-20x slower
    # on deep layers)
    quant = {frozen_name(n + ".weight"): QuantSpec(axis=0) for n, m in module.named_modules()
             if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)}
    feed = inject(module, slots, configs)
    wrapped = {s.module for s in slots}
    params = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    onnx_names = [frozen_name(canonical_param(n, wrapped)) for n in params]
    graphs = _trace(module, feed, slots, params, onnx_names, example_input, len(labels), opset, say, CNN_INPUTS[task])
    add_input_defaults(graphs["infer"], neutral_values(slots))

    say(f"storing frozen weights ({quantize})")
    arrays = dict(zip(onnx_names, load_params(params).values()))
    with atomic.building_dir(out_dir) as tmp:
        fingerprint = save_bundle_graphs(graphs, {"infer": INFER_GRAPH_FILE, "train": TRAIN_GRAPH_FILE}, tmp,
                                         arrays, quant, quantize)
        names = [s.name for s in slots]
        manifest = Manifest(
            fingerprint=fingerprint, source=source or type(module).__module__, architecture=type(module).__name__,
            model_type="cnn", task=task, method=method, quantization=quantize, max_length=1, vocab_size=1,
            pad_token_id=0, slots=tuple(slots), labels=tuple(labels), tokenizer=None, weights=WEIGHTS_FILE,
            graphs={"infer": Graph(INFER_GRAPH_FILE, (CNN_INPUTS[task], *names), (LOGITS,)),
                    "train": Graph(TRAIN_GRAPH_FILE, (CNN_INPUTS[task], LABELS, *names), (LOSS, *map(grad_name, names)))},
            train_layers=kept or None,
            extra={**extra, "layer_regex": regex, "base_parameters": int(sum(p.numel() for p in module.parameters())),
                   "opset": opset, "export_seconds": round(time.perf_counter() - t0, 1), "seed": seed},
            method_config={name: cfg.to_dict() for name, cfg in configs.items()},
        )
        write_manifest(tmp, manifest)
    say(f"wrote {out_dir}")
    return manifest


def _input_extra(task: str, example: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 audio: Mapping[str, Any] | None) -> dict[str, dict]:
    """The manifest's description of the graph input: {"image": ...} or {"audio": ...}, checked against ``example``."""
    c, h, w = (int(d) for d in example.shape[1:])
    if task == AUDIO_CLS:
        from edgepeft.runtime.audio import AudioSpec

        spec = AudioSpec(**audio)
        if (c, h, w) != spec.input_shape or spec.std <= 0:
            raise ExportError(f"example input (1, {c}, {h}, {w}): {spec.features} audio input is (1, *{spec.input_shape}) "
                              "with a positive std")
        return {"audio": spec.to_dict()}
    if len(mean) not in (1, c) or len(std) not in (1, c) or min(std) <= 0:
        raise ExportError(f"mean/std: one value or one per channel ({c}), std positive")
    per_channel = lambda v: [float(x) for x in (list(v) * c)[:c]] if len(v) == 1 else [float(x) for x in v]  # noqa: E731
    return {"image": {"channels": c, "height": h, "width": w, "mean": per_channel(mean), "std": per_channel(std)}}


def _trace(model: nn.Module, feed: DeltaFeed, slots: list[Slot], params: dict[str, torch.Tensor], onnx_names: list[str],
           example: torch.Tensor, n_labels: int, opset: int, say: Callable[[str], None], input_name: str) -> dict:
    """Both graphs; batch 2 while tracing (sizes 0 and 1 are specialized), the batch axis dynamic."""
    infer, train = _functions(model, feed, slots, list(params))
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn((2, *example.shape[1:]), generator=g)
    labels = torch.tensor([0, n_labels - 1])
    deltas = [(torch.randn(s.shape, generator=g) * 0.02).requires_grad_(True) for s in slots]  # distinct: not merged
    frozen = list(params.values())
    b, r = Dim("batch", min=1), Dim("rank", min=0)
    names = [s.name for s in slots]
    say("tracing and exporting the training step")
    train_model = _export(train, [pixels, labels, *deltas, *frozen], [input_name, LABELS, *names, *onnx_names],
                          [LOSS, *map(grad_name, names)], [{0: b}, {0: b}, *[None] * len(slots), *[None] * len(frozen)], opset)
    say("tracing and exporting the inference graph")
    scales, feed.scale = dict(feed.scale), {k: 1.0 for k in feed.scale}  # the runtime folds the LoRA scale into B
    try:
        rank_dyn = [None if (ax := methods.owner(s.kind).infer_axis(s.kind)) is None else {ax: r} for s in slots]
        infer_model = _export(infer, [pixels, *[d.detach() for d in deltas], *frozen], [input_name, *names, *onnx_names],
                              [LOGITS], [{0: b}, *rank_dyn, *[None] * len(frozen)], opset)
    finally:
        feed.scale = scales
    return {"infer": infer_model, "train": train_model}
