"""Metrics of a bundle + delta on a dataset with the inference graph: accuracy for classification,
loss and perplexity for a causal LM."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from edgepeft.names import SEQ_CLS
from edgepeft.runtime.data import Dataset, eval_batches
from edgepeft.runtime.feeds import DeltaLike
from edgepeft.runtime.infer import Predictor


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def evaluate(predictor: Predictor, data: Dataset, deltas: Sequence[DeltaLike] = (), *, batch_size: int = 32,
             max_length: int | None = None) -> dict[str, float]:
    """``accuracy`` and ``loss`` (classification) or ``loss`` and ``perplexity`` (causal LM), plus ``examples``."""
    nll, count, correct = 0.0, 0, 0
    for index in eval_batches(data.lengths, batch_size):
        b = data.batch(index, max_length)
        logits = predictor.logits(b["input_ids"], b["attention_mask"], deltas)
        logp = _log_softmax(logits)
        if data.task == SEQ_CLS:
            y = b["labels"]  # (B,)
            nll -= float(logp[np.arange(len(y)), y].sum())
            correct += int((logits.argmax(-1) == y).sum())
            count += len(y)
        else:  # next-token loss over real targets, as the train graph computes it
            ids, mask = b["input_ids"], b["attention_mask"]
            target = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=2)[..., 0]  # (B, T-1)
            w = mask[:, 1:]
            nll -= float((target * w).sum())
            count += int(w.sum())
    loss = nll / max(1, count)
    if data.task == SEQ_CLS:
        return {"accuracy": correct / max(1, count), "loss": loss, "examples": float(len(data))}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "examples": float(len(data))}


def score(metrics: dict[str, float]) -> float:
    """One number where higher is better, for early stopping and keeping the best delta."""
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]


def describe(metrics: dict[str, float] | None) -> str:
    """Metrics as a short phrase (``accuracy 91.0 %, loss 0.312``)."""
    if not metrics:
        return "n/a"
    if "accuracy" in metrics:
        return f"accuracy {100 * metrics['accuracy']:.1f} %, loss {metrics['loss']:.4f}"
    return f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
