"""``edgepeft chat``: talk to a causal-LM bundle (+ a delta) on the device, one stdin line per turn.

The conversation is rendered with the bundle's chat template each turn and the reply is streamed as
it is generated. ``sampling_options`` are shared with ``edgepeft infer``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import click


def sampling_options(fn: Callable) -> Callable:
    """The generation options of ``chat`` and ``infer`` (checked by runtime.generate.Sampling)."""
    opts = [
        click.option("--max-new-tokens", type=int, default=None, help="Most tokens to generate per reply.  [default: 256 in chat, 20 in infer]"),
        click.option("--temperature", type=float, default=None, help="0: greedy; higher: more varied.  [default: 0.7 in chat, 0 in infer]"),
        click.option("--top-p", type=float, default=0.9, show_default=True, help="Sample from the smallest set of tokens whose probability reaches P."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the K most likely tokens (0: no limit)."),
        click.option("--seed", type=int, default=None, help="Seed of the sampler (same seed, same text)."),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable); it is not printed."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def make_sampling(*, max_new_tokens: int | None, temperature: float | None, top_p: float, top_k: int,
                  seed: int | None, stop: tuple[str, ...], defaults: tuple[int, float]):
    """Sampling from the options; an out-of-range one becomes a usage error naming it."""
    from edgepeft.errors import GenerationError
    from edgepeft.runtime.generate import Sampling

    try:
        return Sampling(max_new_tokens=defaults[0] if max_new_tokens is None else max_new_tokens,
                        temperature=defaults[1] if temperature is None else temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop=tuple(stop))
    except GenerationError as e:
        raise click.UsageError(str(e)) from None


@click.command("chat")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--delta", "deltas", multiple=True, type=click.Path(path_type=Path),
              help="Delta file to apply (repeat to mix several equally).")
@click.option("--system", help="System message that starts the conversation (default: the template's own).")
@sampling_options
def chat_cmd(bundle: Path, deltas: tuple[Path, ...], system: str | None, max_new_tokens, temperature, top_p, top_k,
             seed, stop) -> None:
    """Chat with a causal-LM bundle: type a message, get the reply streamed; Ctrl-D ends.

    \b
    Lines read from stdin are user turns; `/reset` starts a new conversation. Example:
      edgepeft chat smollm2.bundle --delta mine.delta --temperature 0.7 --seed 1
    """
    from edgepeft.delta import load_delta
    from edgepeft.errors import GenerationError
    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.chat_data import load_chat_template
    from edgepeft.runtime.generate import Generator
    from edgepeft.runtime.infer import Predictor

    sampling = make_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             seed=seed, stop=stop, defaults=(256, 0.7))
    b = open_bundle(bundle)
    loaded = [load_delta(d, b.manifest) for d in deltas]
    pieces = load_chat_template(b.path, b.manifest)
    if pieces is None:
        raise GenerationError(f"{bundle}: the bundle has no chat template (its tokenizer had none at export); "
                              "use `edgepeft infer` to continue plain text")
    gen = Generator(Predictor(b))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    tty = sys.stdin.isatty()
    while True:
        if tty:
            click.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        ids = _prompt(gen, pieces, messages, sampling.max_new_tokens)
        reply = []
        for piece in gen.stream(ids, sampling, loaded):
            reply.append(piece)
            click.echo(piece, nl=False)
        click.echo("")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _prompt(gen, pieces: dict, messages: list[dict[str, str]], room: int) -> list[int]:
    """Token ids of the conversation ready for the reply; the oldest turns go when it would not leave ``room``."""
    from edgepeft.runtime.chat_data import render

    while True:
        ids = gen.tokenizer.encode(render(pieces, messages, generation=True), add_special_tokens=False).ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(ids) + room <= gen.context or len(messages) - first <= 1:
            return ids
        del messages[first:first + 2]  # the oldest exchange (user turn and its reply)
