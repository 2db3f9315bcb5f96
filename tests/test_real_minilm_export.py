"""The real model: all-MiniLM-L6-v2 exports to a small int8 bundle that predicts like the fp32 one.

Slow (two real exports, a short training run); CI runs it.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgepeft.demo.assets import rotten_tomatoes_split, write_jsonl
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.data import load_dataset
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.text import load_tokenizer
from edgepeft.runtime.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.slow


def bundle_mb(path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def test_minilm_int8_bundle_is_under_30_mb_with_int8_weights_on_disk(minilm_bundle):
    path = minilm_bundle("int8")
    assert bundle_mb(path) < 30, f"{bundle_mb(path):.1f} MB"
    fp32_params_mb = 22.7e6 * 4 / 2**20  # all-MiniLM-L6-v2 has 22.7 M parameters
    assert bundle_mb(path) < 0.35 * fp32_params_mb  # weights are int8 on disk, not dequantized copies


def test_int8_and_fp32_bundles_give_the_same_label_with_a_trained_delta(minilm_bundle, tmp_path):
    split = rotten_tomatoes_split(seed=0)
    int8 = open_bundle(minilm_bundle("int8"))
    fp32 = open_bundle(minilm_bundle("none"))
    data = load_dataset(write_jsonl(tmp_path / "train.jsonl", split["train"][:1200]), int8.manifest, load_tokenizer(int8))
    delta = Trainer(int8, data, TrainConfig(epochs=2, batch_size=16, lr=2e-3, warmup=0.1)).fit().delta

    texts = [t for t, _ in split["test"]]
    a = Predictor(int8).classify(texts, [delta])
    b = Predictor(fp32).classify(texts, [delta])  # same tensors; the fp32 base only differs by quantization
    agree = np.mean([x.label == y.label for x, y in zip(a, b)])
    trained = np.mean([x.label == label for x, (_, label) in zip(a, split["test"])])
    assert trained > 0.65, f"the delta did not learn (test accuracy {trained:.1%}), so agreement proves little"
    assert agree >= 0.99, f"int8 and fp32 agree on {agree:.1%} of {len(texts)} test sentences"
