"""Metrics of a bundle + delta on a dataset with the inference graph: accuracy for classification,
token accuracy and F1 for token classification, loss and perplexity for a causal LM.

A causal LM's loss is the mean next-token NLL of the target tokens from token 1 on: model.onnx gives logits at the
user's positions only, and position t predicts token t + 1. With virtual tokens in the sequence (prompt tuning,
P-tuning) PEFT also scores token 0, predicted by the last virtual token, whose logits model.onnx does not output; the
train graph scores it (runtime/lm_targets.first_target), this evaluation leaves that one term per example out. So a
prompted bundle's evaluation loss is PEFT's loss without the first token's term (tests/test_virtual_tokens.py), and
it is not the train loss of the same batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from edgepeft.names import CAUSAL_LM, CLASSIFICATION_TASKS, IGNORED_LABEL, SEQ_CLS, TOKEN_CLS
from edgepeft.runtime.data import Dataset, eval_batches
from edgepeft.runtime.feeds import DeltaLike
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.lm_targets import LOSS_MASK

LM_EVAL_LOGITS_MB = 64  # logits of one evaluation batch of a causal LM (SmolLM2 at 256 tokens: 1 row = 50 MB)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _lm_nll(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> float:
    """Summed next-token NLL of the weighted positions; float32, one row at a time (no float64 copy of (T, V))."""
    total = 0.0
    for z, t, w in zip(logits, targets, weights):  # (T, V), (T,), (T,)
        zmax = z.max(-1)
        lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(-1))
        total += float(((lse - z[np.arange(len(t)), t]) * w).sum(dtype=np.float64))
    return total


def token_f1(pred: np.ndarray, gold: np.ndarray, outside: int | None) -> float:
    """Micro F1 over the labelled tokens, the outside label ("O" of BIO tags) not counted as a class.

    Equals scikit-learn's ``f1_score(gold, pred, labels=<all but O>, average="micro")``; without an
    outside label every class counts and the micro F1 is the token accuracy.
    """
    if outside is None:
        return float((pred == gold).mean()) if len(gold) else 0.0
    hits = int(((pred == gold) & (gold != outside)).sum())
    return 2 * hits / max(1, int((pred != outside).sum()) + int((gold != outside).sum()))


def _token_metrics(predictor: Predictor, data: Dataset, deltas: Sequence[DeltaLike], batch_size: int,
                   max_length: int | None) -> dict[str, float]:
    """Loss, accuracy and F1 over the labelled tokens (first sub-word of each word)."""
    nll, preds, golds = 0.0, [], []
    for index in eval_batches(data.lengths, batch_size):
        b = data.batch(index, max_length)
        logits = predictor.logits(b["input_ids"], b["attention_mask"], deltas)  # (B, T, C)
        keep = b["labels"] != IGNORED_LABEL
        z, y = logits[keep], b["labels"][keep]  # (N, C), (N,)
        nll -= float(_log_softmax(z)[np.arange(len(y)), y].sum())
        preds.append(z.argmax(-1))
        golds.append(y)
    pred, gold = np.concatenate(preds), np.concatenate(golds)
    labels = predictor.manifest.labels
    outside = labels.index("O") if "O" in labels else None
    return {"accuracy": float((pred == gold).mean()) if len(gold) else 0.0, "f1": token_f1(pred, gold, outside),
            "loss": nll / max(1, len(gold)), "tokens": float(len(gold)), "examples": float(len(data))}


def evaluate(predictor: Predictor, data: Dataset, deltas: Sequence[DeltaLike] = (), *, batch_size: int = 32,
             max_length: int | None = None) -> dict[str, float]:
    """``accuracy`` and ``loss`` (classification; token classification adds ``f1`` and ``tokens``) or ``loss`` and
    ``perplexity`` (causal LM), plus ``examples``."""
    if data.task == TOKEN_CLS:
        return _token_metrics(predictor, data, deltas, batch_size, max_length)
    nll, count, correct = 0.0, 0, 0
    if data.task == CAUSAL_LM:  # a causal LM's logits are (B, T, V): keep one batch of them under LM_EVAL_LOGITS_MB
        longest = int(min(data.lengths.max(), max_length or data.lengths.max()))
        rows = LM_EVAL_LOGITS_MB * 2**20 // (4 * longest * predictor.manifest.vocab_size)
        batch_size = max(1, min(batch_size, int(rows)))
    for index in eval_batches(data.lengths, batch_size):
        b = data.batch(index, max_length)
        logits = predictor.batch_logits(b, deltas)
        if data.task in CLASSIFICATION_TASKS:
            logp = _log_softmax(logits)
            y = b["labels"]  # (B,)
            nll -= float(logp[np.arange(len(y)), y].sum())
            correct += int((logits.argmax(-1) == y).sum())
            count += len(y)
        else:  # next-token loss over the target tokens from token 1 on (a prompted bundle's token 0: see the docstring)
            w = b[LOSS_MASK][:, 1:]
            nll += _lm_nll(logits[:, :-1], b["input_ids"][:, 1:], w)
            count += int(w.sum())
    loss = nll / max(1, count)
    if data.task in CLASSIFICATION_TASKS:
        return {"accuracy": correct / max(1, count), "loss": loss, "examples": float(len(data))}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "examples": float(len(data))}


def score(metrics: dict[str, float]) -> float:
    """One number where higher is better, for early stopping and keeping the best delta."""
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]


def describe(metrics: dict[str, float] | None) -> str:
    """Metrics as a short phrase (``accuracy 91.0 %, loss 0.312``)."""
    if not metrics:
        return "n/a"
    if "f1" in metrics:
        return f"token accuracy {100 * metrics['accuracy']:.1f} %, F1 {100 * metrics['f1']:.1f} %, loss {metrics['loss']:.4f}"
    if "accuracy" in metrics:
        return f"accuracy {100 * metrics['accuracy']:.1f} %, loss {metrics['loss']:.4f}"
    return f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
