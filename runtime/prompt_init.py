"""A prompt's text init on the device: the base model's embeddings of ``init_text``'s tokens, as PEFT's TEXT init.

PEFT tokenizes the text (special tokens included), cuts the ids to V or repeats them until there are V,
and copies those rows of the word-embedding table. The bundle holds both the tokenizer and the table
(dequantized: the start is the bundle's own embeddings), so the start needs no workstation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edgepeft.delta.format import Delta
from edgepeft.errors import BundleError
from edgepeft.methods.prompt import TEXT_INIT
from edgepeft.runtime.bundle import Bundle
from edgepeft.runtime.weights import read_frozen

INPUT_EMBEDDINGS_KEY = "input_embeddings"  # manifest.extra: the frozen name of the word-embedding table


def text_ids(bundle: Bundle, text: str, count: int) -> list[int]:
    """``count`` token ids of ``text``: cut, or repeated whole and then cut (PEFT's rule)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle.path / bundle.manifest.tokenizer))  # untruncated: the text may be long
    ids = tok.encode(text).ids
    if not ids:
        raise BundleError(f"{bundle.path}: prompt.init_text {text!r} has no tokens")
    return (ids * -(-count // len(ids)))[:count]


def with_text_init(bundle: Bundle, delta: Delta) -> Delta:
    """``delta`` with every text-initialized prompt slot set to its text's embeddings (other slots shared as they are)."""
    slots = [s for s in bundle.manifest.slots if s.init == TEXT_INIT]
    if not slots:
        return delta
    table = read_frozen(bundle)[bundle.manifest.extra[INPUT_EMBEDDINGS_KEY]]  # (vocab, H)
    text = bundle.manifest.method_config["prompt"]["init_text"]
    tensors = dict(delta.tensors)
    for s in slots:
        tensors[s.name] = np.array(table[text_ids(bundle, text, s.shape[0])], np.float32)
    return dataclasses.replace(delta, tensors=tensors)
