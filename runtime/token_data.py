"""Token-classification data: a label per word (BIO tags), read from JSONL and aligned to sub-word tokens.

A row is ``{"tokens": ["John", "lives", ...], "labels": ["B-PER", "O", ...]}`` (words given) or
``{"text": "John lives ...", "labels": [...]}`` (words = the text split on whitespace). Each word's label
goes on its first sub-word token; later sub-words and special tokens get ``IGNORED_LABEL`` (the loss and
the metrics skip them), as Hugging Face's token-classification recipe does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

from edgepeft.errors import DataError
from edgepeft.manifest import Manifest
from edgepeft.names import IGNORED_LABEL
from edgepeft.runtime.data import Dataset, jsonl_objects, label_index


def _words(obj: dict, where: str) -> list[str]:
    if "tokens" in obj:
        words = obj["tokens"]
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise DataError(f"{where}: 'tokens' must be a list of non-empty strings")
    elif isinstance(obj.get("text"), str):
        words = obj["text"].split()
    else:
        raise DataError(f"{where}: expected {{\"tokens\": [...], \"labels\": [...]}} or {{\"text\": \"...\", \"labels\": [...]}}")
    if not words:
        raise DataError(f"{where}: no words")
    return words


def read_token_rows(path: Path, manifest: Manifest) -> Iterator[tuple[int, list[str], list[int]]]:
    """(line, words, label index per word) of each row; any bad row is a DataError naming its line."""
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise DataError(f"{path}: a token-classification bundle reads .jsonl rows like "
                        '{"tokens": ["John", "lives"], "labels": ["B-PER", "O"]}')
    for n, where, obj in jsonl_objects(path):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        words = _words(obj, where)
        labels = obj.get("labels")
        if not isinstance(labels, list):
            raise DataError(f"{where}: 'labels' must be a list with one label per word")
        if len(labels) != len(words):
            raise DataError(f"{where}: {len(labels)} labels for {len(words)} words; give one label per word")
        yield n, words, [label_index(v, manifest.labels, where) for v in labels]


def align(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Per-token labels: each word's label on its first token, IGNORED_LABEL elsewhere (specials, later sub-words)."""
    out, seen = [], set()
    for w in word_ids:
        if w is None or w in seen:
            out.append(IGNORED_LABEL)
        else:
            seen.add(w)
            out.append(word_labels[w])
    return out


def load_token_dataset(path: Path, manifest: Manifest, tokenizer) -> Dataset:
    """Read, check, tokenize (words pre-split) and align a token-classification file."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    rows = list(read_token_rows(path, manifest))
    if not rows:
        raise DataError(f"{path}: no examples; the file is empty")
    encs = tokenizer.encode_batch([words for _, words, _ in rows], is_pretokenized=True)
    tags = [align(e.word_ids, labels) for e, (_, _, labels) in zip(encs, rows)]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Dataset(path, manifest.task, [e.ids for e in encs], None, [n for n, _, _ in rows], sha, manifest.pad_token_id,
                   token_labels=tags)
