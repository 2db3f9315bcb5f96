"""Pitched frames with known pitch, synthesized in numpy: harmonic tones, clean or heard through a telephone band with noise.

A tone is one 64 ms frame (1024 samples at 16 kHz) of a harmonic sound: f0 log-uniform in ``F0_RANGE`` (within
CREPE's 32.7-1975 Hz), 3 to 12 harmonics below 7.6 kHz with random amplitudes (a random spectral tilt) and phases.
The shifted condition is what a phone line does to a voice: only the harmonics inside ``TELEPHONE_BAND`` survive
(the fundamental of every tone below 300 Hz is gone, and so are its low harmonics), and white noise is added at a
random SNR in ``SNR_DB``. Harmonics are dropped, not filtered, so the band edge is exact and the frame has no filter
transient. The same seed gives the same tones in both conditions, so "before" and "after" see the same pitches.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from edgepeft import atomic

SAMPLE_RATE = 16000
WINDOW = 1024
F0_RANGE = (70.0, 600.0)  # Hz: low male voice to a soprano's middle; half the tones lose their fundamental
TELEPHONE_BAND = (300.0, 3400.0)  # Hz: the narrowband telephone channel (ITU-T G.712)
SNR_DB = (0.0, 10.0)
MAX_HARMONICS = 12
NYQUIST_MARGIN = 7600.0  # no harmonic above this (below the 8 kHz Nyquist frequency)


def tones(n: int, seed: int, *, shifted: bool) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1024) float32 frames and their (n,) f0 in Hz; ``shifted``: telephone band and noise (same tones per seed)."""
    rng = np.random.default_rng(seed)
    f0 = np.exp(rng.uniform(np.log(F0_RANGE[0]), np.log(F0_RANGE[1]), n))  # (n,)
    k = np.arange(1, MAX_HARMONICS + 1)[None, :]  # (1, K)
    count = rng.integers(3, MAX_HARMONICS + 1, n)[:, None]  # harmonics per tone
    tilt = rng.uniform(0.5, 1.5, n)[:, None]
    amp = rng.uniform(0.3, 1.0, (n, MAX_HARMONICS)) * k ** -tilt  # (n, K)
    phase = rng.uniform(0, 2 * np.pi, (n, MAX_HARMONICS))
    snr = rng.uniform(*SNR_DB, n)[:, None]
    noise = rng.standard_normal((n, WINDOW))  # drawn in both conditions, so the tones match
    freq = f0[:, None] * k  # (n, K)
    keep = (k <= count) & (freq < NYQUIST_MARGIN)
    if shifted:
        keep &= (freq >= TELEPHONE_BAND[0]) & (freq <= TELEPHONE_BAND[1])
    t = np.arange(WINDOW) / SAMPLE_RATE  # (T,)
    waves = np.einsum("nk,nkt->nt", amp * keep, np.sin(2 * np.pi * freq[:, :, None] * t + phase[:, :, None]))
    if shifted:
        power = (waves ** 2).mean(-1, keepdims=True)
        waves = waves + noise * np.sqrt(power / 10 ** (snr / 10))
    waves = 0.5 * waves / np.maximum(np.abs(waves).max(-1, keepdims=True), 1e-9)  # peak 0.5: fits 16-bit WAV
    return waves.astype(np.float32), f0


def write_set(root: Path, waves: np.ndarray, f0: np.ndarray) -> Path:
    """Frames as 16-bit 16 kHz WAV files under ``root/clips`` and ``root/labels.csv`` (``audio,label``: the nearest
    pitch bin's name, runtime/pitch.py) beside ``root/f0.npy`` (the exact pitches, for the error in cents); returns the .csv."""
    from edgepeft.runtime.pitch import bin_labels, hz_to_bin

    names, rows = bin_labels(), ["audio,label"]
    (root / "clips").mkdir(parents=True, exist_ok=True)
    for i, (w, b) in enumerate(zip(waves, hz_to_bin(f0))):
        name = f"clips/{i:05d}.wav"
        with wave.open(str(root / name), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes((np.clip(w, -1, 32767 / 32768) * 32768).astype("<i2").tobytes())
        rows.append(f"{name},{names[b]}")
    np.save(root / "f0.npy", np.asarray(f0, np.float64))
    atomic.write_text(root / "labels.csv", "\n".join(rows) + "\n")  # last and atomic: it commits the clips before it
    return root / "labels.csv"
