"""CREPE's pitch bins on the device, numpy only: bin <-> cents <-> Hz, the bundle's label names, weighted-argmax
decoding and the pitch error of a batch of logits.

A pitch bundle (exporters/crepe.py) is an audio classifier whose labels are CREPE's 360 bins, 20 cents apart
from 1997.38 cents (31.70 Hz; cents are 1200 log2(f / 10 Hz), torchcrepe's convention); a label names its bin's
centre frequency in Hz with two decimals ("31.70"), so a label file's ``label`` column is ``bin_label(hz_to_bin(f0))``.
Decoding is torchcrepe's ``weighted_argmax`` without its dither: the sigmoid-weighted mean of the cents of the 9 bins
around the most likely one (the weights are the bins' exact centres, so a repeated run decodes the same pitch).
"""

from __future__ import annotations

import numpy as np

PITCH_BINS = 360
CENTS_PER_BIN = 20.0
CENTS_OFFSET = 1997.3794084376191  # the cents of bin 0 (torchcrepe's convert.bins_to_cents)
DECODE_HALF_WINDOW = 4  # bins each side of the argmax that weighted_argmax averages over (torchcrepe: -4 .. +4)
RPA_CENTS = 50.0  # raw pitch accuracy counts an estimate within this many cents of the truth


def bin_cents(bins: np.ndarray | int) -> np.ndarray:
    """The centre of each bin, in cents."""
    return CENTS_PER_BIN * np.asarray(bins, np.float64) + CENTS_OFFSET


def cents_to_hz(cents: np.ndarray | float) -> np.ndarray:
    return 10.0 * 2.0 ** (np.asarray(cents, np.float64) / 1200.0)


def hz_to_cents(hz: np.ndarray | float) -> np.ndarray:
    return 1200.0 * np.log2(np.asarray(hz, np.float64) / 10.0)


def hz_to_bin(hz: np.ndarray | float) -> np.ndarray:
    """The nearest bin to each frequency, clipped to the 360 bins (the label a frame of that pitch gets)."""
    return np.clip(np.rint((hz_to_cents(hz) - CENTS_OFFSET) / CENTS_PER_BIN), 0, PITCH_BINS - 1).astype(np.int64)


def bin_labels() -> list[str]:
    """The bundle's 360 label names: each bin's centre frequency in Hz, two decimals (distinct: bins are 0.38 Hz apart at least)."""
    return [f"{hz:.2f}" for hz in cents_to_hz(bin_cents(np.arange(PITCH_BINS)))]


def is_pitch_bundle(labels: list[str] | tuple[str, ...]) -> bool:
    """Whether a bundle's labels are CREPE's 360 bins (its outputs then decode to a pitch, not a class)."""
    return len(labels) == PITCH_BINS and list(labels) == bin_labels()


def decode_cents(logits: np.ndarray) -> np.ndarray:
    """(N, 360) logits -> (N,) pitch in cents: the sigmoid-weighted mean of the bins within 4 of the argmax."""
    logits = np.asarray(logits, np.float64)
    centre = logits.argmax(-1)  # (N,)
    offsets = np.arange(-DECODE_HALF_WINDOW, DECODE_HALF_WINDOW + 1)
    idx = centre[:, None] + offsets[None, :]  # (N, 9); torchcrepe's window is cut at the ends, not shifted
    inside = (idx >= 0) & (idx < logits.shape[-1])
    z = np.take_along_axis(logits, np.clip(idx, 0, logits.shape[-1] - 1), -1)
    p = np.where(inside, 1.0 / (1.0 + np.exp(-z)), 0.0)  # (N, 9)
    return (p * bin_cents(idx)).sum(-1) / np.maximum(p.sum(-1), 1e-30)


def describe(logits: np.ndarray) -> list[str]:
    """One line per frame for a person: the decoded pitch in Hz and the most likely bin's sigmoid (CREPE's confidence)."""
    hz = cents_to_hz(decode_cents(logits))
    confidence = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64).max(-1)))
    return [f"{f:.1f} Hz\tconfidence={c:.3f}" for f, c in zip(hz, confidence)]


def pitch_errors(logits: np.ndarray, true_hz: np.ndarray) -> dict[str, float]:
    """Mean absolute error in cents and raw pitch accuracy (share within 50 cents) of decoded ``logits`` against ``true_hz``."""
    err = np.abs(decode_cents(logits) - hz_to_cents(true_hz))
    return {"rpa": float((err <= RPA_CENTS).mean()), "mae_cents": float(err.mean()),
            "median_cents": float(np.median(err)), "frames": float(len(err))}
