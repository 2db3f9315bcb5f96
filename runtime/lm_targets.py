"""Which positions a causal LM's train step scores: padded batch + loss mask -> the graph's target feeds.

The train graph scores only the positions handed to it (exporters/causal_lm.py), laid out as
(K, M): K chunks fixed at export, M = ceil(N / K) for N scored positions, padding marked -1. A
bundle exported before issue 16 takes no target inputs and scores every unpadded position.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgepeft.manifest import Manifest
from edgepeft.methods import virtual_tokens
from edgepeft.names import ATTENTION_MASK, INPUT_IDS, TARGET_IDS, TARGET_INDEX

LOSS_MASK = "loss_mask"  # (B, T) in a causal-LM batch: 1 where token t is a target (predicted from t - 1)


def loss_chunks(session: ort.InferenceSession) -> int:
    """K of a train session's target layout; 0 for a bundle whose train graph scores every position itself."""
    for i in session.get_inputs():
        if i.name == TARGET_INDEX:
            return int(i.shape[0])
    return 0


def first_target(manifest: Manifest) -> int:
    """The first token a causal LM's train step can score: 1 (token t is predicted at position t - 1), or 0 for a
    bundle with virtual tokens in its sequence, whose last one predicts token 0 and whose graph's position t is the
    state that predicts token t (PEFT's prompt-learning loss)."""
    return 0 if virtual_tokens(manifest.slots, "sequence") else 1


def target_feeds(input_ids: np.ndarray, loss_mask: np.ndarray, chunks: int, first: int = 1) -> dict[str, np.ndarray]:
    """``target_index`` / ``target_ids`` (K, M) for the tokens ``loss_mask`` marks from token ``first`` on (:func:`first_target`)."""
    b, t = np.nonzero(loss_mask[:, first:])
    t = t + first
    n = len(b)
    m = max(1, -(-n // chunks))
    index = np.zeros(chunks * m, np.int64)
    targets = np.full(chunks * m, -1, np.int64)
    index[:n] = b * input_ids.shape[1] + t - first
    targets[:n] = input_ids[b, t]
    return {TARGET_INDEX: index.reshape(chunks, m), TARGET_IDS: targets.reshape(chunks, m)}


def scored(loss_mask: np.ndarray, first: int = 1) -> int:
    """Number of target tokens in a batch: the weight of its mean loss when batches are accumulated."""
    return int(loss_mask[:, first:].sum())


def train_feeds(batch: dict[str, np.ndarray], chunks: int, first: int = 1) -> dict[str, np.ndarray]:
    """A causal-LM batch (ids, mask, loss mask) as train-graph feeds; ``first``: :func:`first_target` of the bundle."""
    feeds = {INPUT_IDS: batch[INPUT_IDS], ATTENTION_MASK: batch[ATTENTION_MASK]}
    if chunks:
        feeds.update(target_feeds(batch[INPUT_IDS], batch.get(LOSS_MASK, batch[ATTENTION_MASK]), chunks, first))
    return feeds
