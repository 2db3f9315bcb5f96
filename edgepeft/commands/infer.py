"""``edgepeft infer``: run a bundle on text on the device (numpy + onnxruntime only)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("infer")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1, required=True)
@click.option("--delta", "deltas", multiple=True, type=click.Path(path_type=Path),
              help="Delta file to apply; repeat to mix several (with --weights).")
@click.option("--weights", help="Comma-separated mixing weights for repeated --delta (default: all 1).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True,
              help="Causal LM: tokens to generate greedily.")
def infer_cmd(bundle: Path, texts: tuple[str, ...], deltas: tuple[Path, ...], weights: str | None,
              max_new_tokens: int) -> None:
    """Classify TEXTS (labels with probabilities) or continue them (causal LM).

    \b
    Examples:
      edgepeft infer minilm.bundle "a gorgeous, witty film"
      edgepeft infer minilm.bundle --delta mine.delta "a gorgeous, witty film"
    """
    from edgepeft.delta import load_delta
    from edgepeft.names import SEQ_CLS
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
    if b.manifest.task == SEQ_CLS:
        for text, pred in zip(texts, predictor.classify(list(texts), loaded, mix)):
            ranked = sorted(pred.probabilities.items(), key=lambda lp: -lp[1])
            click.echo(f"{pred.label}\t" + "  ".join(f"{l}={v:.3f}" for l, v in ranked) + f"\t{text}")
    else:
        for text in texts:
            click.echo(text + " " + predictor.generate(text, max_new_tokens, loaded, mix))
