"""Text generation on the device: a KV-cache loop over model.onnx, sampling, stop strings, streamed text.

The prompt is run once (prefill); each further call feeds one token and the cache the previous call
returned, so a token costs one position instead of the whole sequence. A bundle exported without a
cache (before issue 16, or GPT-2) is run on the whole sequence each step: same tokens, slower.
The delta feeds are built once per generation, not per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from edgepeft.errors import GenerationError
from edgepeft.names import ATTENTION_MASK, CAUSAL_LM, INPUT_IDS, LOGITS
from edgepeft.runtime.feeds import DeltaLike, after_prefill
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.kv_cache import first_call, next_cache
from edgepeft.runtime.text import untruncated


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen and when generation stops."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy (the most likely token)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1: all)
    seed: int | None = None  # of the sampling generator (None: a fresh one each time)
    stop: tuple[str, ...] = ()  # text that ends generation (not included in the output)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"--top-k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"--top-p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise GenerationError("--stop strings must not be empty")


def choose(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """The next token from one position's logits (V,): greedy, or sampled after temperature, top-k and top-p."""
    if s.temperature == 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / s.temperature
    if 0 < s.top_k < len(z):
        z[z < np.partition(z, -s.top_k)[-s.top_k]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1:
        order = np.argsort(-p)
        keep = np.searchsorted(np.cumsum(p[order]), s.top_p) + 1  # the smallest prefix reaching top_p
        cut = np.zeros_like(p)
        cut[order[:keep]] = p[order[:keep]]
        p = cut / cut.sum()
    return int(rng.choice(len(p), p=p))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might start a stop string (or are a half-decoded character): not shown yet."""
    n = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), n, -1):
            if text.endswith(stop[:k]):
                n = k
                break
    return n


class Generator:
    """Generates text from a causal-LM bundle with any delta, streaming it piece by piece."""

    def __init__(self, predictor: Predictor) -> None:
        if predictor.manifest.task != CAUSAL_LM:
            raise GenerationError(f"{predictor.bundle.path}: a {predictor.manifest.task} bundle does not generate text")
        self.predictor = predictor
        m = predictor.manifest
        self.context = int(m.extra.get("context_length", m.max_length))  # positions the model was trained for
        self.eos = m.eos_token_id
        self.tokenizer = untruncated(predictor.tokenizer)  # a prompt may be longer than the training max length

    def tokens(self, prompt: list[int], sampling: Sampling, deltas: Sequence[DeltaLike] = (),
               weights: Sequence[float] | None = None) -> Iterator[int]:
        """New token ids after ``prompt``, one at a time, until end-of-sequence, the limit or the context is full."""
        p = self.predictor
        cache, slots = first_call(p.manifest, p.cache, 1, p.slot_feeds(deltas, weights))  # a prefix is the first cache
        rng = np.random.default_rng(sampling.seed)
        ids = list(prompt)
        step = np.asarray([ids], np.int64)
        for _ in range(sampling.max_new_tokens):
            if len(ids) >= self.context:
                return
            feeds = {INPUT_IDS: step, ATTENTION_MASK: np.ones_like(step), **cache, **slots}
            if p.cache:
                out = dict(zip(self._outputs, p.session.run(self._outputs, feeds)))
                cache = next_cache(p.cache, out)
                slots = after_prefill(p.manifest, slots)  # the cache carries the virtual tokens from here on
            else:
                out = {LOGITS: p.session.run([LOGITS], feeds)[0]}
            nxt = choose(out[LOGITS][0, -1], sampling, rng)
            if nxt == self.eos:
                return
            yield nxt
            ids.append(nxt)
            step = np.asarray([[nxt]] if p.cache else [ids], np.int64)

    @property
    def _outputs(self) -> list[str]:
        return [LOGITS, *(c.present for c in self.predictor.cache)]

    def stream(self, prompt: str | list[int], sampling: Sampling = Sampling(), deltas: Sequence[DeltaLike] = (),
               weights: Sequence[float] | None = None) -> Iterator[str]:
        """The continuation of ``prompt`` (text, or token ids as they are) as text pieces, ending before any stop string."""
        tok = self.tokenizer
        ids = tok.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise GenerationError("the prompt is empty")
        new: list[int] = []
        shown = 0
        for t in self.tokens(ids, sampling, deltas, weights):
            new.append(t)
            text = tok.decode(new, skip_special_tokens=True)
            hits = [i for i in (text.find(s, max(0, shown - len(s))) for s in sampling.stop) if i >= 0]
            if hits:
                if min(hits) > shown:
                    yield text[shown:min(hits)]
                return
            end = len(text) - _held_back(text, sampling.stop)
            if end > shown:
                yield text[shown:end]
                shown = end
        text = tok.decode(new, skip_special_tokens=True)
        if len(text) > shown:
            yield text[shown:]
