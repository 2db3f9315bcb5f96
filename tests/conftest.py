"""Shared fixtures: tiny models built from configs, and bundles exported from them once per session."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@dataclass
class ArrayDelta:
    """The minimal delta the runtime feeds need: tensors by slot name and the LoRA scale."""

    tensors: dict[str, np.ndarray]
    scale: float = 1.0


def random_delta(manifest, seed: int = 0, magnitude: float = 0.1) -> ArrayDelta:
    """Non-zero values in every slot (B included), so every delta path is exercised."""
    rng = np.random.default_rng(seed)
    t = {s.name: (rng.standard_normal(s.shape) * magnitude).astype(np.float32) for s in manifest.slots}
    lora = [s for s in manifest.slots if s.rank]
    return ArrayDelta(t, lora[0].scale if lora else 1.0)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    from tiny_models import make_model

    root = tmp_path_factory.mktemp("models")
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = make_model(kind, root)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def bundles(model_dirs, tmp_path_factory):
    """bundles(kind, quantize="none", method=...) -> opened Bundle, exported once per session."""
    from edgepeft.exporters.export import export_bundle
    from edgepeft.runtime.bundle import open_bundle

    root = tmp_path_factory.mktemp("bundles")
    cache = {}

    def get(kind: str, quantize: str = "none", method: str | None = None, **kw):
        method = method or ("lora+bitfit" if kind in ("bert", "roberta", "distilbert") else "lora")
        key = (kind, quantize, method, tuple(sorted(kw.items())))
        if key not in cache:
            out = root / "-".join(map(str, [kind, quantize, method.replace("+", "_"), *kw.values()]))
            export_bundle(model_dirs(kind), out, quantize=quantize, method=method, rank=4, alpha=8, **kw)
            cache[key] = open_bundle(out)
        return cache[key]

    return get
