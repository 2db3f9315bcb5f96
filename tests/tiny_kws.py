"""A tiny keyword-spotting setup: the KWS CNN at small widths over quarter-second clips, and "words" that are
noisy tones (one pitch per word), written as 16 kHz mono WAV files: learnable in a few dozen steps, no speech
synthesizer needed."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgepeft.runtime.audio import AudioSpec
from tiny_cnn import randomize_batchnorm

WORDS = ("low", "mid", "high")
PITCH = {"low": 300.0, "mid": 900.0, "high": 2500.0}  # Hz
SPEC = AudioSpec(samples=4000, n_fft=256, hop=128, mels=16, mean=-6.0, std=4.0)  # 0.25 s: 16 mels x 30 frames


def tiny_kws(seed: int = 0) -> nn.Module:
    """The KWS CNN with 4 and 8 channels, seeded, with BatchNorm statistics that are not the identity."""
    from edgepeft.exporters.kws_cnn import KwsCnn

    torch.manual_seed(seed)
    return randomize_batchnorm(KwsCnn(len(WORDS), mels=SPEC.mels, widths=(4, 8)), seed + 1, affine=False).eval()


def export_tiny_kws(out: Path, quantize: str = "int8", seed: int = 0, method: str = "lora+bn",
                    config: dict | None = None):
    """The tiny KWS CNN exported as an audio bundle: by default LoRA r=4 on every convolution (the first merged into its
    weight, exporters/methods/lora.merged; the second a branch), BN tuning, its own head kept."""
    from edgepeft.exporters.audio_specs import SPECS
    from edgepeft.exporters.modules import export_bundle
    from edgepeft.names import AUDIO_CLS

    config = {"lora.rank": 4} if config is None else config
    # exported as export_audio exports the KWS CNN (its for_export rewrite); the parity tests run torch on tiny_kws as written
    return export_bundle(SPECS["kws-cnn"].for_export(tiny_kws(seed)), torch.zeros(1, 1, SPEC.mels, SPEC.frames), out,
                         labels=WORDS, head="fc", keep_head=True, method=method, method_config=config, quantize=quantize,
                         task=AUDIO_CLS, audio=SPEC.to_dict())


def tone(word: str, rng: np.random.Generator, samples: int = SPEC.samples) -> np.ndarray:
    """A clip of ``word``'s tone (its pitch within 5 %, random phase, onset and loudness) in noise, int16."""
    t = np.arange(samples) / SPEC.sample_rate
    f = PITCH[word] * rng.uniform(0.95, 1.05)
    x = rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    x[: rng.integers(0, samples // 4)] = 0
    x += rng.normal(0, 0.05, samples)
    return np.clip(x * 32767, -32768, 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int = SPEC.sample_rate, channels: int = 1) -> Path:
    """``samples`` (int16, interleaved when ``channels`` > 1) as a PCM WAV file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, "<i2").tobytes())
    return path


def word_folder(root: Path, per_word: int, seed: int) -> Path:
    """``root/<word>/<i>.wav`` with ``per_word`` tone clips of each word."""
    rng = np.random.default_rng(seed)
    for word in WORDS:
        for i in range(per_word):
            write_wav(root / word / f"{i}.wav", tone(word, rng))
    return root
