"""Training and evaluation data: read a file, check every row against the bundle, plan padded batches.

Formats (by extension): ``.jsonl`` (``{"text": ..., "label": ...}``; ``{"text": ...}`` for a causal
LM), ``.csv`` with a header naming ``text`` and ``label`` columns, ``.txt`` (one example per line,
causal LM only). Labels are names from the manifest or indices into it. Any bad row is a DataError
naming the file and line, raised before anything trains.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from edgepeft.errors import DataError
from edgepeft.manifest import Manifest
from edgepeft.names import CAUSAL_LM, IGNORED_LABEL, SEQ_CLS, TOKEN_CLS
from edgepeft.runtime.lm_targets import LOSS_MASK
from edgepeft.runtime.text import pad_batch

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "text"}
BUCKET_BATCHES = 50  # batches per length-sorting chunk: long enough to group lengths, short enough to stay random


@dataclass(frozen=True)
class Row:
    """One example as read: its text, its label index (None for causal LM), and where it came from."""

    text: str
    label: int | None
    line: int


@dataclass
class Dataset:
    """Tokenized examples of one file: ids per example, label indices (classification), source lines."""

    path: Path
    task: str
    ids: list[list[int]]
    labels: np.ndarray | None  # (N,) int64 for classification
    lines: list[int]
    sha256: str  # of the file's bytes: a resumed run checks it trains on the same data
    pad_id: int = 0
    loss_masks: list[list[int]] | None = None  # causal LM: 1 per token that is a target (instruction data: the completion)
    token_labels: list[list[int]] | None = None  # token classification: a label per token, IGNORED_LABEL where none

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.ids), dtype=np.int64, count=len(self.ids))

    def batch(self, index: np.ndarray | list[int], max_length: int | None = None) -> dict[str, np.ndarray]:
        """The padded batch of examples ``index``: ids and mask (B, T) padded to the longest row, labels (B,) or (B, T)."""
        seqs = [self.ids[i][:max_length] if max_length else self.ids[i] for i in index]
        ids, mask = pad_batch(seqs, self.pad_id)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.task == CAUSAL_LM:  # which tokens are targets: every real one, or what the loss masks mark
            out[LOSS_MASK] = mask if self.loss_masks is None else pad_batch(
                [self.loss_masks[i][:max_length] if max_length else self.loss_masks[i] for i in index], 0)[0]
        if self.labels is not None:
            out["labels"] = self.labels[np.asarray(index, dtype=np.int64)]
        if self.token_labels is not None:  # padding carries no label
            out["labels"] = pad_batch([self.token_labels[i][:max_length] if max_length else self.token_labels[i]
                                       for i in index], IGNORED_LABEL)[0]
        return out


# ---- reading ------------------------------------------------------------------------------------

def label_index(value: object, labels: tuple[str, ...], where: str) -> int:
    """A label index from a name or an index; names win when a label is itself a number."""
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: label {value!r} is not a label name or index")
    if isinstance(value, str):
        if value in labels:
            return labels.index(value)
        if value.strip().lstrip("-").isdigit():
            value = int(value.strip())
        else:
            raise DataError(f"{where}: unknown label {value!r}; the bundle's labels are {', '.join(labels)}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise DataError(f"{where}: label {value!r} is not a label name or index")
    if not 0 <= value < len(labels):
        raise DataError(f"{where}: label index {value} is out of range; the bundle has {len(labels)} labels ({', '.join(labels)})")
    return value


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: 'text' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty text")
    return value


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a UTF-8 file; a bad byte names its line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{n}: not valid UTF-8") from None


def jsonl_objects(path: Path, lines: Iterable[tuple[int, str]] | None = None) -> Iterator[tuple[int, str, Any]]:
    """(line number, "path:line", parsed value) of each non-blank line of a JSONL file (``lines``: its
    numbered lines when already open); invalid JSON is a DataError naming its line."""
    for n, line in lines if lines is not None else _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield n, where, obj


def _read_jsonl(path: Path, manifest: Manifest) -> Iterator[Row]:
    for n, where, obj in jsonl_objects(path):
        if not isinstance(obj, dict) or "text" not in obj:
            raise DataError(f"{where}: expected an object with a 'text' key, like {{\"text\": \"...\", \"label\": \"...\"}}")
        yield _row(obj.get("text"), obj.get("label"), "label" in obj, manifest, where, n)


def _read_csv(path: Path, manifest: Manifest) -> Iterator[Row]:
    text = "\n".join(line.rstrip("\r\n") for _, line in _lines(path))
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        return
    cols = [h.strip().lower() for h in header]
    if "text" not in cols or (manifest.task == SEQ_CLS and "label" not in cols):
        need = "text,label" if manifest.task == SEQ_CLS else "text"
        raise DataError(f"{path}:1: the header must name the columns {need}; found {','.join(header)}")
    ti, li = cols.index("text"), cols.index("label") if "label" in cols else None
    start = reader.line_num + 1
    for row in reader:
        where = f"{path}:{start}"
        if row:
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
            yield _row(row[ti], None if li is None else row[li], li is not None, manifest, where, start)
        start = reader.line_num + 1


def _read_text(path: Path, manifest: Manifest) -> Iterator[Row]:
    if manifest.task != CAUSAL_LM:
        raise DataError(f"{path}: plain text has no labels; a {manifest.task} bundle needs .jsonl or .csv with a label")
    for n, line in _lines(path):
        if line.strip():  # blank lines separate examples
            yield Row(line.rstrip("\r\n"), None, n)


def _row(text: object, label: object, has_label: bool, manifest: Manifest, where: str, line: int) -> Row:
    text = _text(text, where)
    if manifest.task != SEQ_CLS:
        return Row(text, None, line)  # a causal LM ignores any label
    if not has_label:
        raise DataError(f"{where}: no label; a classification bundle needs one of {', '.join(manifest.labels)}")
    return Row(text, label_index(label, manifest.labels, where), line)


def read_rows(path: str | os.PathLike, manifest: Manifest) -> list[Row]:
    """Every row of a data file, checked against the manifest (labels, task)."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown data format {path.suffix or '(no extension)'!r}; use .jsonl, .csv or .txt")
    reader = {"jsonl": _read_jsonl, "csv": _read_csv, "text": _read_text}[fmt]
    rows = list(reader(path, manifest))
    if not rows:
        raise DataError(f"{path}: no examples; the file is empty")
    return rows


def load_dataset(path: str | os.PathLike, manifest: Manifest, tokenizer, *, bundle_path: Path | None = None) -> Dataset:
    """Read, check and tokenize a data file for this bundle (``bundle_path``: where its chat template is)."""
    path = Path(os.fspath(path))
    if manifest.task == TOKEN_CLS:  # a label per word (runtime/token_data.py)
        from edgepeft.runtime.token_data import load_token_dataset

        return load_token_dataset(path, manifest, tokenizer)
    if manifest.task == CAUSAL_LM and FORMATS.get(path.suffix.lower()) == "jsonl" and path.is_file():
        return _load_lm_jsonl(path, manifest, tokenizer, bundle_path)
    rows = read_rows(path, manifest)
    ids = [e.ids for e in tokenizer.encode_batch([r.text for r in rows])]
    if manifest.task == CAUSAL_LM:
        for r, s in zip(rows, ids):
            if len(s) < 2:  # one token has nothing to predict
                raise DataError(f"{path}:{r.line}: text is one token; a language model needs at least 2 to learn from")
    labels = None if manifest.task != SEQ_CLS else np.array([r.label for r in rows], dtype=np.int64)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Dataset(path, manifest.task, ids, labels, [r.line for r in rows], sha, manifest.pad_token_id)


def _load_lm_jsonl(path: Path, manifest: Manifest, tokenizer, bundle_path: Path | None) -> Dataset:
    """A causal LM's JSONL: instruction rows (loss on the completion only) and text rows (runtime/chat_data.py)."""
    from edgepeft.runtime.chat_data import load_chat_template, lm_rows

    pieces = load_chat_template(bundle_path, manifest) if bundle_path is not None else None
    rows = list(lm_rows(path, _lines(path), tokenizer, pieces, manifest.max_length))
    if not rows:
        raise DataError(f"{path}: no examples; the file is empty")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Dataset(path, manifest.task, [r[1] for r in rows], None, [r[0] for r in rows], sha, manifest.pad_token_id,
                   loss_masks=[r[2] for r in rows])


# ---- batching -----------------------------------------------------------------------------------

def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """As many example indices as there are labels, drawn with replacement so that every label present is equally
    likely: a device whose rows are mostly one label (a fleet's usual skew) then does not teach the shared
    adapter its own label prior."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    p = 1.0 / counts[inverse]
    return rng.choice(len(labels), size=len(labels), replace=True, p=p / p.sum())


def plan_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                 bucket_batches: int = BUCKET_BATCHES, labels: np.ndarray | None = None) -> list[np.ndarray]:
    """One epoch's batches: shuffle, sort chunks of ``bucket_batches`` batches by length, cut, shuffle batch order.

    Sorting within chunks keeps similar lengths together (less padding) while the chunk and batch
    shuffles keep the order random; everything depends only on ``rng``, so a resumed run replays it.
    ``labels``: draw the epoch label-balanced (:func:`balanced_order`) instead of shuffling every example once.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    order = rng.permutation(len(lengths)) if labels is None else balanced_order(labels, rng)
    chunk = batch_size * max(1, bucket_batches)
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def split_batch(index: np.ndarray, micro: int) -> list[np.ndarray]:
    """Cut one batch into micro-batches of at most ``micro`` examples (for a memory budget)."""
    return [index[i:i + micro] for i in range(0, len(index), micro)]


def split_by_tokens(index: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut one batch into runs whose padded size (examples x longest) stays within ``max_tokens``.

    A memory budget's length buckets: short batches run whole, long ones in pieces; one example always runs.
    """
    pieces, start, longest = [], 0, 0
    for i, n in enumerate(lengths[index]):
        longest = max(longest, int(n))
        if i > start and (i - start + 1) * longest > max_tokens:
            pieces.append(index[start:i])
            start, longest = i, int(n)
    pieces.append(index[start:])
    return pieces


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches for evaluation: sorted by length (least padding), order irrelevant."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
