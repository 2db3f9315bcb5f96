"""``edgepeft infer``: run a bundle on text on the device (numpy + onnxruntime only)."""

from __future__ import annotations

from pathlib import Path

import click

from edgepeft.commands.chat import make_sampling, sampling_options


@click.command("infer")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1, required=True)  # image bundles: image files (.png, .jpg, .npy); audio: .wav
@click.option("--delta", "deltas", multiple=True, type=click.Path(path_type=Path),
              help="Delta file to apply; repeat to mix several (with --weights).")
@click.option("--weights", help="Comma-separated mixing weights for repeated --delta (default: all 1).")
@click.option("--chat", "as_chat", is_flag=True, help="Causal LM: send each text as a user message through the chat template.")
@sampling_options
def infer_cmd(bundle: Path, texts: tuple[str, ...], deltas: tuple[Path, ...], weights: str | None, as_chat: bool,
              max_new_tokens, temperature, top_p, top_k, seed, stop) -> None:
    """Classify TEXTS (labels with probabilities), tag their words (token classification) or continue them (causal LM,
    streamed); image bundles classify image files, audio bundles 16 kHz mono WAV files (a pitch bundle prints each
    frame's pitch in Hz).

    \b
    Examples:
      edgepeft infer minilm.bundle "a gorgeous, witty film"
      edgepeft infer minilm.bundle --delta mine.delta "a gorgeous, witty film"
      edgepeft infer smollm2.bundle --chat --temperature 0.7 --seed 1 "Write a haiku about tea"
    """
    from edgepeft.delta import load_delta
    from edgepeft.names import AUDIO_CLS, IMAGE_CLS, SEQ_CLS, TOKEN_CLS
    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.infer import Predictor

    b = open_bundle(bundle)
    loaded = [load_delta(d, b.manifest) for d in deltas]
    mix = None
    if weights is not None:
        try:
            mix = [float(w) for w in weights.split(",")]
        except ValueError:
            raise click.BadParameter("expected comma-separated numbers", param_hint="--weights") from None
        if len(mix) != len(loaded):
            raise click.BadParameter(f"{len(mix)} weights for {len(loaded)} deltas", param_hint="--weights")
    predictor = Predictor(b)
    if b.manifest.task in (IMAGE_CLS, AUDIO_CLS):  # TEXTS are image files or WAV files
        from edgepeft.runtime.infer import softmax

        from edgepeft.runtime.pitch import describe, is_pitch_bundle

        labels = b.manifest.labels
        for name in texts:
            logits = predictor.image_logits(_cnn_input(b.manifest, Path(name)), loaded, mix)
            if is_pitch_bundle(labels):  # 360 pitch bins: say the decoded pitch, not 360 probabilities
                click.echo(f"{describe(logits)[0]}\t{name}")
                continue
            p = softmax(logits)[0]
            ranked = sorted(zip(labels, p), key=lambda lp: -lp[1])
            click.echo(f"{ranked[0][0]}\t" + "  ".join(f"{l}={v:.3f}" for l, v in ranked) + f"\t{name}")
    elif b.manifest.task == SEQ_CLS:
        for text, pred in zip(texts, predictor.classify(list(texts), loaded, mix)):
            ranked = sorted(pred.probabilities.items(), key=lambda lp: -lp[1])
            click.echo(f"{pred.label}\t" + "  ".join(f"{l}={v:.3f}" for l, v in ranked) + f"\t{text}")
    elif b.manifest.task == TOKEN_CLS:  # word/LABEL per word
        for tagged in predictor.tag(list(texts), loaded, mix):
            click.echo(" ".join(f"{w}/{l}" for w, l in tagged))
    else:
        from edgepeft.errors import GenerationError
        from edgepeft.runtime.chat_data import load_chat_template, render
        from edgepeft.runtime.generate import Generator

        sampling = make_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 seed=seed, stop=stop, defaults=(20, 0.0))
        gen = Generator(predictor)
        pieces = load_chat_template(b.path, b.manifest) if as_chat else None
        if as_chat and pieces is None:
            raise GenerationError(f"{bundle}: --chat needs a chat template; this bundle's tokenizer had none at export")
        for text in texts:
            if pieces is not None:
                prompt = gen.tokenizer.encode(render(pieces, [{"role": "user", "content": text}], generation=True),
                                              add_special_tokens=False).ids
            else:
                prompt = text
                click.echo(text + " ", nl=False)
            for piece in gen.stream(prompt, sampling, loaded, mix):
                click.echo(piece, nl=False)
            click.echo("")


def _cnn_input(manifest, path: Path):
    """The model input (1, C, H, W) of one image file, or of one WAV file for an audio bundle."""
    from edgepeft.names import AUDIO_CLS

    if manifest.task == AUDIO_CLS:
        from edgepeft.runtime.audio import AudioSpec, model_input, read_wav

        spec = AudioSpec.of(manifest)
        return model_input(read_wav(path, spec)[None], spec)
    from edgepeft.runtime.images import ImageSpec, image_file, to_model_input

    return to_model_input(image_file(path)[None], ImageSpec.of(manifest))
