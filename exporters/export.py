"""``export_bundle``: a local Hugging Face model directory in, a bundle directory out.

Steps: check the options, load the model (eager attention, seeded head), plan and inject the delta
slots, trace both graphs, quantize and store the frozen weights once, write tokenizer and manifest.
Everything is built in a temporary folder and renamed at the end: no half-written bundle.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from edgepeft.errors import ExportError
from edgepeft.manifest import Graph, Manifest, neutral_values, write_manifest
from edgepeft.names import (ATTENTION_MASK, CAUSAL_LM, CHAT_TEMPLATE_FILE, CLASSIFICATION_TASKS, INFER_GRAPH_FILE, INPUT_IDS, LABELS,
                            LOGITS, LOSS, TASKS, TOKENIZER_FILE, TRAIN_GRAPH_FILE, WEIGHTS_FILE, frozen_name, grad_name)
from edgepeft import atomic, methods
from edgepeft.frozen import IN_OUT_KEY

QUANTIZATIONS = ("none", "int8", "int4")


def _check_options(model_dir: Path, outs: Mapping[str, Path], method: str, shortcuts: Mapping[str, Any],
                   method_config: Mapping[str, Any], max_length: int, task: str | None) -> tuple[tuple[methods.Method, ...], dict[str, methods.MethodConfig]]:
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: no such model directory")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: no config.json; expected a Hugging Face model directory (save_pretrained output)")
    if not outs:
        raise ExportError("no output directory given")
    for quantize, out_dir in outs.items():
        if quantize not in QUANTIZATIONS:
            raise ExportError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
        if out_dir.exists():
            raise ExportError(f"{out_dir}: already exists; remove it or choose another output directory")
    if len({p.resolve() for p in outs.values()}) < len(outs):
        raise ExportError("each quantization needs its own output directory")
    chosen = methods.parse(method)
    # --rank/--alpha/--targets are shortcuts for the options of those names, for the chosen methods that have
    # them (so `--method bitfit` ignores the default rank); --method-config entries win over them.
    takers = {f for m in chosen for f, _ in m.config_cls.help()}
    given = {k: tuple(v) if k == "targets" else v for k, v in shortcuts.items() if v is not None and k in takers}
    configs = methods.configs(chosen, {**given, **method_config})
    if max_length < 2:
        raise ExportError(f"max length must be at least 2, got {max_length}")
    if task is not None and task not in TASKS:
        raise ExportError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return chosen, configs


def _labels(config, labels: list[str] | None, num_labels: int | None) -> list[str]:
    if labels:
        if num_labels is not None and num_labels != len(labels):
            raise ExportError(f"--num-labels {num_labels} disagrees with {len(labels)} --labels")
        if len(set(labels)) != len(labels):
            raise ExportError("--labels has duplicates")
        return list(labels)
    n = num_labels or getattr(config, "num_labels", 2) or 2
    if n < 2:
        raise ExportError(f"a classifier needs at least 2 labels, got {n}")
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(n)]
    return names if len(set(names)) == n else [str(i) for i in range(n)]


def export_bundle(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, quantize: str = "int8",
                  **options: Any) -> Manifest:
    """Export the model in ``model_dir`` to one bundle in ``out_dir``; options as ``export_bundles``."""
    return export_bundles(model_dir, {quantize: out_dir}, **options)[quantize]


def export_bundles(
    model_dir: str | os.PathLike,
    outs: Mapping[str, str | os.PathLike],
    *,
    task: str | None = None,
    labels: list[str] | None = None,
    num_labels: int | None = None,
    method: str = "lora",
    rank: int | None = None,
    alpha: float | None = None,
    targets: list[str] | None = None,
    method_config: Mapping[str, Any] | None = None,
    top_layers: int | str | None = "auto",
    max_length: int = 128,
    opset: int = 20,
    seed: int = 0,
    source: str | os.PathLike | None = None,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict[str, Manifest]:
    """Export the model in ``model_dir`` once per quantization, ``{"int8": out_dir, ...}``; return the manifests.

    The model is traced once: every bundle has the same graphs and differs only in how its frozen
    weights are stored (so an fp32 and an int4 bundle of one model cost one trace).

    ``method``: registered method names joined by '+' (``edgepeft.methods.names()``); ``method_config``:
    their options, ``{"lora.rank": 4}`` or ``{"rank": 4}`` (every chosen method with that option);
    ``rank``/``alpha``/``targets`` are shortcuts for those options. Options are checked before the model
    is loaded, and against the model before anything is traced.
    ``top_layers``: slots only in the last N layers (the backward pass stops there); ``"auto"`` (the
    default, as on the command line) is the top third, at least 2; ``None`` or ``"all"``: every layer.
    ``source``: what the manifest records as the model's origin (default ``model_dir``; the CLI gives the
    GGUF file it converted, since ``model_dir`` is then a temporary folder).
    """
    model_dir, outs = Path(os.fspath(model_dir)), {q: Path(os.fspath(o)) for q, o in outs.items()}
    chosen, configs = _check_options(model_dir, outs, method, {"rank": rank, "alpha": alpha, "targets": targets},
                                     dict(method_config or {}), max_length, task)
    t0 = time.perf_counter()
    say = lambda msg: progress(f"[{time.perf_counter() - t0:6.1f}s] {msg}")  # noqa: E731

    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from edgepeft.exporters.architectures import family_for, infer_task, model_class
    from edgepeft.exporters.causal_lm import cache_layers, kv_shape, lm_graphs
    from edgepeft.exporters.chat_template import derive_pieces
    from edgepeft.exporters.inject import canonical_param, inject, layers_of, linear_dims, plan_slots, resolve_top_layers
    from edgepeft.exporters.trace import export_graphs
    from edgepeft.exporters.weights import QuantSpec, add_input_defaults, load_params, save_bundle_graphs

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    say(f"reading {model_dir}")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError) as e:
        raise ExportError(f"{model_dir}/config.json: cannot be read ({str(e).splitlines()[0]})") from None
    family = family_for(config.model_type)
    task = task or infer_task(family, getattr(config, "architectures", None))
    if task not in family.tasks:
        raise ExportError(f"a {config.model_type} model cannot be exported for {task}; it supports: {', '.join(family.tasks)}")
    label_names = _labels(config, labels, num_labels) if task in CLASSIFICATION_TASKS else []
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or max_length
    max_length = min(max_length, int(max_pos))

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (ValueError, OSError, TypeError) as e:
        raise ExportError(f"{model_dir}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{model_dir}: the tokenizer has no fast (tokenizer.json) form; the device runtime needs one")

    say(f"loading the {config.model_type} model for {task}")
    torch.manual_seed(seed)  # the classifier head of a base model is initialized here: seeded, so exports repeat
    kwargs = {"attn_implementation": "eager"}
    if task in CLASSIFICATION_TASKS:
        model = model_class(task).from_pretrained(
            model_dir, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={l: i for i, l in enumerate(label_names)}, ignore_mismatched_sizes=True, **kwargs)
    else:
        model = model_class(task).from_pretrained(model_dir, **kwargs)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    top_layers = resolve_top_layers(len(layers_of(model, family)), top_layers)  # "auto" -> a count; None = every layer
    auto = tuple(m for m in methods.get_all() if task in m.auto_tasks and m not in chosen)
    slots = plan_slots(model, family, chosen=chosen + auto, configs=configs, head=task in CLASSIFICATION_TASKS, top_layers=top_layers,
                       max_length=max_length)
    if not slots:
        raise ExportError("no delta slots: the method, targets and --top-layers select nothing")
    virtual = methods.virtual_tokens(slots)  # positions the virtual tokens take from every call (issue 14)
    max_length -= virtual  # the user's tokens: what the runtime truncates to
    quant = {}
    for name, mod in model.named_modules():
        if (dims := linear_dims(mod)) is not None:
            quant[frozen_name(name + ".weight")] = QuantSpec(axis=1 if type(mod).__name__ == "Conv1D" else 0)
        elif isinstance(mod, torch.nn.Embedding) and mod.weight.numel() >= 1024:
            quant[frozen_name(name + ".weight")] = QuantSpec(axis=0, embedding=True)
    feed = inject(model, slots, configs)
    wrapped = {s.module for s in slots if not methods.owner(s.kind).virtual}  # virtual tokens wrap no module
    # GPT-2's Conv1D stores its weight (in, out): recorded so numpy readers of the base weights orient them.
    in_out = sorted(m for m in wrapped if type(model.get_submodule(m).base).__name__ == "Conv1D")
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}

    onnx_names = [frozen_name(canonical_param(n, wrapped)) for n in params]
    vocab = int(config.vocab_size)
    graphs = export_graphs(model, feed, slots, task, params, onnx_names, vocab=vocab,
                           num_labels=len(label_names), opset=opset, progress=say)
    inputs = {i.name for i in graphs["infer"].graph.input}  # a causal LM's prefix is its cache, not an input
    add_input_defaults(graphs["infer"], neutral_values([s for s in slots if s.name in inputs]))  # runs with no delta fed

    arrays = dict(zip(onnx_names, load_params(params).values()))
    slot_names = [s.name for s in slots]
    batch = [INPUT_IDS, ATTENTION_MASK] + ([LABELS] if task in CLASSIFICATION_TASKS else [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    chat = derive_pieces(tokenizer) if task == CAUSAL_LM else None
    manifests = {}
    for quantize, out_dir in outs.items():
        say(f"storing frozen weights ({quantize})")
        with atomic.building_dir(out_dir) as tmp:
            # attach() rewrites the graphs in place: each bundle quantizes its own copy
            fingerprint = save_bundle_graphs({k: copy.deepcopy(g) for k, g in graphs.items()},
                                             {"infer": INFER_GRAPH_FILE, "train": TRAIN_GRAPH_FILE}, tmp, arrays, quant, quantize)
            tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER_FILE))
            if chat is not None:
                atomic.write_text(tmp / CHAT_TEMPLATE_FILE, json.dumps(chat, indent=1, sort_keys=True))
            manifest = Manifest(
                fingerprint=fingerprint, source=str(Path(os.fspath(source or model_dir)).resolve()), architecture=type(model).__name__,
                model_type=config.model_type, task=task, method=method, quantization=quantize, max_length=max_length,
                vocab_size=vocab, pad_token_id=int(pad), slots=tuple(slots), labels=tuple(label_names),
                eos_token_id=tokenizer.eos_token_id, tokenizer=TOKENIZER_FILE, weights=WEIGHTS_FILE,
                chat_template=CHAT_TEMPLATE_FILE if chat is not None else None,
                graphs=lm_graphs(slots, cache_layers(config)) if task == CAUSAL_LM else {
                    "infer": Graph(INFER_GRAPH_FILE, (INPUT_IDS, ATTENTION_MASK, *slot_names), (LOGITS,)),
                    "train": Graph(TRAIN_GRAPH_FILE, (*batch, *slot_names), (LOSS, *map(grad_name, slot_names))),
                },
                train_layers=None if top_layers is None or virtual else tuple(sorted({i for s in slots if (i := _layer(family, s.module)) is not None})),
                extra={"base_parameters": int(sum(p.numel() for p in model.parameters())), "opset": opset,
                       "export_seconds": round(time.perf_counter() - t0, 1), "seed": seed,
                       **({"context_length": int(max_pos) - virtual} if task == CAUSAL_LM else {}),
                       **({"virtual_tokens": virtual, "kv_shape": list(kv_shape(config)),  # what PEFT's config and the text init need
                           "input_embeddings": next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)}
                          if virtual else {}),
                       **({IN_OUT_KEY: in_out} if in_out else {})},
                method_config={name: c.to_dict() for name, c in configs.items()},
            )
            write_manifest(tmp, manifest)
        say(f"wrote {out_dir}")
        manifests[quantize] = manifest
    return manifests


def _layer(family, module: str) -> int | None:
    from edgepeft.exporters.architectures import layer_index

    return layer_index(family, module)

