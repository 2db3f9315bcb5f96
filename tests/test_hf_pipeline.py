"""A bundle plus a delta in a ``transformers`` pipeline (edgepeft/hf) gives edgepeft's own inference results."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_delta
from edgepeft.hf import bundle_pipeline, bundle_tokenizer
from edgepeft.runtime.infer import Predictor

TEXTS = ["w1 w2 w3 w40", "w5 w77", "w9 w10 w11 w12 w13 w14 w15"]


def test_text_classification_pipeline_gives_edgepeft_infer_probabilities(bundles):
    b = bundles("bert", "int8")
    delta = random_delta(b.manifest, seed=4, magnitude=0.5)  # large enough to move the labels off the base model's
    got = bundle_pipeline(b.path, [delta], top_k=None)(TEXTS)
    want = Predictor(b).classify(TEXTS, [delta])
    base = Predictor(b).classify(TEXTS)
    for g, w, o in zip(got, want, base):
        assert {d["label"]: d["score"] for d in g} == pytest.approx(w.probabilities, abs=1e-6)
        assert w.probabilities != pytest.approx(o.probabilities, abs=1e-3)  # the delta is really applied


def test_token_classification_pipeline_tags_tokens_as_edgepeft_logits_do(bundles):
    b = bundles("bert-token", "int8", method="lora+bitfit")
    delta = random_delta(b.manifest, seed=5, magnitude=0.5)
    text = "w1 w2.w3 w40 w61"
    got = bundle_pipeline(b.path, [delta])(text)  # one entry per token whose label is not "O"
    ids = bundle_tokenizer(b)(text)["input_ids"]
    logits = Predictor(b).logits(np.array([ids]), np.ones((1, len(ids)), np.int64), [delta])[0]
    labels = [b.manifest.labels[int(i)] for i in logits.argmax(-1)]
    want = {t: labels[t] for t in range(1, len(ids) - 1) if labels[t] != "O"}
    assert {e["index"]: e["entity"] for e in got} == want
