"""Train the keyword-spotting CNN (exporters/kws_cnn.py) on a folder of word clips: the workstation's base model.

The clips are read and turned into log-mel features by the device's own reader (runtime/audio.py), so the base
learns exactly the features a device computes; the features' mean and std become the model's normalization and
travel in the weights file's metadata (exporters/audio_specs.py reads them back at export).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from edgepeft.exporters.audio_specs import save_audio_weights
from edgepeft.exporters.kws_cnn import KwsCnn
from edgepeft.runtime.audio import AudioSpec, log_mel, read_wav

BATCH = 32
LR = 3e-3
WEIGHT_DECAY = 1e-4


def folder_features(root: Path, words: Sequence[str], spec: AudioSpec) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features (N, 1, mels, frames) and word indices of a ``word/clip.wav`` folder, as the device reads them."""
    files = [(f, list(words).index(f.parent.name)) for f in sorted(root.glob("*/*.wav"))]
    return log_mel(np.stack([read_wav(f, spec) for f, _ in files]), spec), np.array([y for _, y in files])


def train_kws(root: Path, words: Sequence[str], epochs: int, out: Path, seed: int = 0) -> tuple[KwsCnn, AudioSpec]:
    """Train a KwsCnn on ``root/<word>/*.wav`` for ``epochs`` (AdamW, batch 32) and save it to ``out`` with its features."""
    x, y = folder_features(root, words, AudioSpec())
    spec = AudioSpec(mean=round(float(x.mean()), 4), std=round(float(x.std()), 4))
    x = (x - spec.mean) / spec.std
    torch.manual_seed(seed)
    model = KwsCnn(len(words), spec.mels)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // BATCH)):
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    save_audio_weights(model, out, labels=list(words), features=spec.to_dict())
    return model, spec


def accuracy(model: nn.Module, root: Path, words: Sequence[str], spec: AudioSpec) -> float:
    """The model's accuracy on a ``word/clip.wav`` folder (features as the device computes them)."""
    x, y = folder_features(root, words, spec)
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean())
