"""Learnable synthetic tasks over the tiny models' words w0..w89, written as data files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CYCLE = ["w1", "w2", "w3", "w4", "w5"]


def word_group_rows(n: int, seed: int) -> list[dict]:
    """3 labels: the label's group (w0-29, w30-59, w60-89) supplies 3/4 of the words, the rest are random."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        y, length = int(rng.integers(3)), int(rng.integers(6, 16))
        k = int(np.ceil(0.75 * length))
        words = [f"w{30 * y + int(rng.integers(30))}" for _ in range(k)] + [f"w{int(rng.integers(90))}" for _ in range(length - k)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": f"LABEL_{y}" if rng.random() < 0.5 else y})  # names and indices
    return rows


def pattern_lines(n: int, seed: int) -> list[str]:
    """A language of one rule: w1 w2 w3 w4 w5 repeat, starting anywhere, 8-19 words long."""
    rng = np.random.default_rng(seed)
    return [" ".join(CYCLE[(int(o) + i) % 5] for i in range(int(rng.integers(8, 20)))) for o in rng.integers(5, size=n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def classification_files(root: Path, n_train: int = 1200, n_val: int = 150) -> tuple[Path, Path]:
    """train.jsonl and val.jsonl of the word-group task under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    return (write_jsonl(root / "train.jsonl", word_group_rows(n_train, 1)),
            write_jsonl(root / "val.jsonl", word_group_rows(n_val, 2)))
