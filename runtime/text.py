"""Text to padded id batches with the bundle's ``tokenizer.json`` (HF tokenizers, no transformers)."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from edgepeft.errors import BundleError
from edgepeft.runtime.bundle import Bundle


def load_tokenizer(bundle: Bundle) -> Tokenizer:
    """The bundle's tokenizer, truncating to its max length and not padding (batches pad themselves)."""
    m = bundle.manifest
    if not m.tokenizer:
        raise BundleError(f"{bundle.path}: the bundle has no tokenizer; pass token ids instead of text")
    path = bundle.path / m.tokenizer
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise BundleError(f"{path}: cannot be read ({str(e).splitlines()[0][:200]})") from None
    tok.no_padding()
    tok.enable_truncation(max_length=m.max_length)
    return tok


def encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (special tokens included, truncated)."""
    return [e.ids for e in tok.encode_batch(list(texts))]


def pad_batch(seqs: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence (rounded up to ``multiple``): (ids, mask), both (B, T) int64."""
    longest = max(1, max(len(s) for s in seqs))
    t = -(-longest // multiple) * multiple
    ids = np.full((len(seqs), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), t), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def untruncated(tok: Tokenizer) -> Tokenizer:
    """A copy of ``tok`` that never truncates (prompts and chat data must be measured, not silently cut)."""
    copy = Tokenizer.from_str(tok.to_str())
    copy.no_truncation()
    return copy
