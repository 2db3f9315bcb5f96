"""Inference on the device: logits, labels with probabilities, greedy continuation.

One session per bundle, built once; the delta (or a mix of deltas) is chosen per call through the
graph's delta inputs, so switching adapters rebuilds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgepeft.names import ATTENTION_MASK, CAUSAL_LM, CNN_INPUTS, INPUT_IDS, LOGITS, SEQ_CLS, TOKEN_CLS
from edgepeft.runtime.bundle import Bundle, SessionConfig
from edgepeft.runtime.feeds import DeltaLike, infer_feeds, neutral_feeds
from edgepeft.runtime.kv_cache import cache_specs, first_call
from edgepeft.runtime.text import encode, load_tokenizer, pad_batch


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]


class Predictor:
    """Runs a bundle's inference graph with any delta."""

    def __init__(self, bundle: Bundle, config: SessionConfig = SessionConfig()) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.session = bundle.session("infer", config)
        self._neutral = neutral_feeds(self.manifest)  # built once: a call with no delta copies nothing
        self.cache = cache_specs(self.session)  # a causal LM's KV-cache inputs (none in older bundles)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.bundle)
        return self._tokenizer

    def logits(self, ids: np.ndarray, mask: np.ndarray, deltas: Sequence[DeltaLike] = (),
               weights: Sequence[float] | None = None) -> np.ndarray:
        """Raw logits for a padded batch: (B, C) for classification, (B, T, V) for causal LM."""
        cache, slots = first_call(self.manifest, self.cache, len(ids), self.slot_feeds(deltas, weights))  # a prefix is the cache
        feeds = {INPUT_IDS: ids.astype(np.int64), ATTENTION_MASK: mask.astype(np.int64), **cache, **slots}
        return self.session.run([LOGITS], feeds)[0]

    def image_logits(self, pixels: np.ndarray, deltas: Sequence[DeltaLike] = (),
                     weights: Sequence[float] | None = None) -> np.ndarray:
        """Raw logits (B, C) for a batch of normalized images (B, channels, H, W) (runtime/images.py makes them),
        or of an audio bundle's input: log-mel features (B, 1, mels, frames) or waves (B, 1, samples, 1) (runtime/audio.py)."""
        feeds = {CNN_INPUTS[self.manifest.task]: np.ascontiguousarray(pixels, np.float32), **self.slot_feeds(deltas, weights)}
        return self.session.run([LOGITS], feeds)[0]

    def batch_logits(self, batch: dict[str, np.ndarray], deltas: Sequence[DeltaLike] = ()) -> np.ndarray:
        """Logits of a dataset batch (runtime/data.py, image_data.py or audio_data.py), whichever input it carries."""
        if self.manifest.task in CNN_INPUTS:
            return self.image_logits(batch[CNN_INPUTS[self.manifest.task]], deltas)
        return self.logits(batch[INPUT_IDS], batch[ATTENTION_MASK], deltas)

    def slot_feeds(self, deltas: Sequence[DeltaLike] = (), weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
        """The delta-slot feeds of a call: the neutral ones (built once) when there is no delta."""
        return infer_feeds(self.manifest, deltas, weights) if deltas else self._neutral

    def classify(self, texts: Sequence[str], deltas: Sequence[DeltaLike] = (), weights: Sequence[float] | None = None,
                 batch_size: int = 32) -> list[Prediction]:
        """Label and per-label probability for each text."""
        if self.manifest.task != SEQ_CLS:
            raise ValueError("classify() needs a sequence-classification bundle")
        labels = self.manifest.labels
        out: list[Prediction] = []
        for i in range(0, len(texts), batch_size):
            ids, mask = pad_batch(encode(self.tokenizer, list(texts[i:i + batch_size])), self.manifest.pad_token_id)
            probs = softmax(self.logits(ids, mask, deltas, weights))
            for p in probs:
                out.append(Prediction(labels[int(p.argmax())], {l: float(v) for l, v in zip(labels, p)}))
        return out

    def tag(self, texts: Sequence[str], deltas: Sequence[DeltaLike] = (), weights: Sequence[float] | None = None,
            batch_size: int = 32) -> list[list[tuple[str, str]]]:
        """(word, label) for each whitespace-separated word of each text: the label of its first sub-word token."""
        if self.manifest.task != TOKEN_CLS:
            raise ValueError("tag() needs a token-classification bundle")
        out: list[list[tuple[str, str]]] = []
        for i in range(0, len(texts), batch_size):
            words = [t.split() for t in texts[i:i + batch_size]]
            encs = self.tokenizer.encode_batch(words, is_pretokenized=True)
            ids, mask = pad_batch([e.ids for e in encs], self.manifest.pad_token_id)
            best = self.logits(ids, mask, deltas, weights).argmax(-1)  # (B, T)
            for ws, e, row in zip(words, encs, best):
                first = {}
                for t, w in enumerate(e.word_ids):
                    if w is not None:
                        first.setdefault(w, t)
                out.append([(w, self.manifest.labels[int(row[first[k]])] if k in first else "") for k, w in enumerate(ws)])
        return out

    def generate(self, prompt: str, max_new_tokens: int = 20, deltas: Sequence[DeltaLike] = (),
                 weights: Sequence[float] | None = None) -> str:
        """Greedy continuation of ``prompt`` (stops at the end-of-sequence token or the max length); see runtime/generate.py."""
        from edgepeft.runtime.generate import Generator, Sampling

        if self.manifest.task != CAUSAL_LM:
            raise ValueError("generate() needs a causal-lm bundle")
        return "".join(Generator(self).stream(prompt, Sampling(max_new_tokens=max_new_tokens), deltas, weights))
