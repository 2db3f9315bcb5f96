"""Logit adjustment (balanced softmax) on the device: train against logits shifted by τ·log of the local label prior.

A label-skewed device (a fleet's usual case) otherwise teaches the shared head its own prior: with one label in its
data, the quickest way down its loss is the head's bias. Shifting the logits by log π during training (Menon et al.
2021; FedLC, Zhang et al. 2022) leaves that prior to the shift, so the device's update carries what separates the
labels. The shift is exact without touching the train graph: the head's bias delta enters the logits additively
(``y += db``), so feeding ``db + τ·log π`` computes the adjusted loss and its gradients; the optimizer keeps the
unshifted ``db``, and the delta that leaves the device predicts with plain logits.
"""

from __future__ import annotations

import numpy as np

from edgepeft.errors import TrainError
from edgepeft.manifest import Manifest
from edgepeft.names import BIAS, IGNORED_LABEL, WEIGHT, slot_name


def label_prior(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Each label's share of the local data, add-one smoothed so a label the device never saw keeps a finite log;
    token classification's unlabelled positions (``IGNORED_LABEL``) are not counted."""
    labels = np.asarray(labels, np.int64).ravel()
    counts = np.bincount(labels[labels != IGNORED_LABEL], minlength=num_labels)[:num_labels]
    return (counts + 1.0) / (counts.sum() + num_labels)


def head_bias_slot(manifest: Manifest) -> str:
    """The bias slot of the classifier head (the module with a weight delta of one row per label)."""
    heads = sorted({s.module for s in manifest.slots
                    if s.kind == WEIGHT and len(s.shape) == 2 and s.shape[0] == len(manifest.labels)})
    names = {s.name for s in manifest.slots}
    found = [slot_name(m, BIAS) for m in heads if slot_name(m, BIAS) in names]
    if len(found) != 1:
        raise TrainError(f"--logit-adjust shifts the classifier head's bias; this bundle has {len(found)} head bias slots "
                         f"({', '.join(found) or 'none'}): export it with a head (--method ...+head) or drop --logit-adjust")
    return found[0]


def bias_shift(manifest: Manifest, labels: np.ndarray | None, tau: float) -> dict[str, np.ndarray]:
    """What to add to the fed head bias for logit adjustment of strength ``tau`` on data with these labels ({} when off)."""
    if not tau:
        return {}
    if labels is None:
        raise TrainError(f"--logit-adjust needs a label per example; {manifest.task} data has none")
    prior = label_prior(labels, len(manifest.labels))
    return {head_bias_slot(manifest): (tau * np.log(prior)).astype(np.float32)}
