"""Frozen tensors a method adds to the bundle (methods3): stored once in weights.bin, as the method defines them."""

from __future__ import annotations

import json

import numpy as np
import torch
import transformers as tf

from edgepeft.names import VERA_B, VERA_D, WEIGHTS_INDEX_FILE, XS_R
from edgepeft.runtime.weights import read_frozen


def test_vera_projections_are_stored_once_for_every_target(bundles):
    bundle = bundles("llama", "int8", method="vera")
    index = json.loads((bundle.path / WEIGHTS_INDEX_FILE).read_text())["tensors"]
    vera = sorted(n for n in index if "vera_" in n)
    assert vera == ["frozen.vera_A", "frozen.vera_B"]
    r = next(s.shape[0] for s in bundle.manifest.slots if s.kind == VERA_D)
    widest = max(s.shape[0] for s in bundle.manifest.slots if s.kind == VERA_B)
    assert index["frozen.vera_B"]["shape"] == [widest, r] and index["frozen.vera_A"]["shape"][0] == r
    assert index["frozen.vera_A"]["dtype"] == "float32"  # not quantized with the base


def test_loraxs_factors_are_the_truncated_svd_of_the_source_weight(bundles, model_dirs):
    bundle = bundles("bert", "int8", method="loraxs")
    frozen = read_frozen(bundle)
    source = tf.AutoModelForSequenceClassification.from_pretrained(model_dirs("bert")).state_dict()
    for s in (s for s in bundle.manifest.slots if s.kind == XS_R):
        w = source[f"{s.module}.weight"].double()
        u, sv, vt = torch.linalg.svd(w, full_matrices=False)
        r = s.shape[0]
        best = (u[:, :r] * sv[:r]) @ vt[:r]  # the rank-r truncation of the fp32 source (not of the int8 copy)
        ours = frozen[f"{s.module}.xs_U"].astype(np.float64) @ frozen[f"{s.module}.xs_V"].astype(np.float64)
        assert np.abs(ours - best.numpy()).max() < 1e-5 * float(w.abs().max())
        vt_ours = frozen[f"{s.module}.xs_V"].astype(np.float64)
        assert np.allclose(vt_ours @ vt_ours.T, np.eye(r), atol=1e-5)  # orthonormal rows: V_rᵀ
