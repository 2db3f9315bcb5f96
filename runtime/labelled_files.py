"""Labelled media files for a classifier bundle, shared by images and audio: which file carries which label.

Two layouts: a folder of label folders (``root/<label>/<file>``, the folder names the label) and a label file
(``.csv`` with the header ``<column>,label``, file paths relative to it); for arrays (``.npy``, IDX), ``label_array``
checks their label array. Only paths and label indices come out; decoding is the caller's (runtime/image_data.py,
runtime/audio_data.py). ``digest`` fingerprints the data, so a resumed run can check it trains on the same files.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from edgepeft.errors import DataError
from edgepeft.manifest import Manifest
from edgepeft.runtime.data import label_index


def from_folder(root: Path, manifest: Manifest, suffixes: tuple[str, ...], noun: str) -> list[tuple[Path, int]]:
    """(file, label) for every ``root/<label>/<file>`` with one of ``suffixes``; an empty label folder is an error."""
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = label_index(d.name, manifest.labels, str(d))
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"{d}: a class folder with no {noun} ({', '.join(suffixes)})")
        out += [(f, label) for f in files]
    return out


def from_csv(path: Path, manifest: Manifest, column: str) -> list[tuple[Path, int]]:
    """(file, label) for every row of a ``<column>,label`` .csv; a missing file or unknown label names the line."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [h.strip().lower() for h in rows[0]][:2] != [column, "label"]:
        raise DataError(f"{path}:1: the header must be {column},label")
    out = []
    for n, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) < 2:
            raise DataError(f"{path}:{n}: expected {column},label")
        file = path.parent / row[0].strip()
        if not file.is_file():
            raise DataError(f"{path}:{n}: no such {column} {file}")
        out.append((file, label_index(row[1].strip(), manifest.labels, f"{path}:{n}")))
    return out


def label_array(labels: np.ndarray, count: int, manifest: Manifest, where: Path, noun: str) -> np.ndarray:
    """``labels`` as int64 indices, checked: one integer per example (``count`` of them), each one of the bundle's labels."""
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"{where}: {labels.shape} labels for {count} {noun}; expected one label per {noun.rstrip('s')}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integer indices, got {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= len(manifest.labels)))
    if bad.size:
        raise DataError(f"{where}: label {int(labels[bad[0]])} at row {int(bad[0])} is out of range; "
                        f"the bundle has {len(manifest.labels)} labels")
    return labels.astype(np.int64)


def digest(path: Path) -> str:
    """sha256 over the names and bytes of a file, or of every file under a folder."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()
