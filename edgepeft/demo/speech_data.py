"""Spoken keywords synthesized offline: espeak-ng voices and variants, speed and pitch, placed at a random
onset in a one-second clip with white noise, written as 16 kHz mono 16-bit WAV folders (``<set>/<word>/<i>.wav``).
Shared by ``edgepeft demo --task speech`` and benchmarks/bench_speech.py; needs the Debian packages espeak-ng
and sox (workstation side).

espeak-ng speaks at 22,050 Hz; sox resamples to 16 kHz on the workstation (the device refuses other
rates). Every clip is drawn from a seeded generator, so a set is the same on every run; callers cache sets.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")  # the Speech Commands core ten
RATE = 16000
# The workstation's speakers: four English accents x four espeak-ng variants.
BASE_VOICES = tuple(f"{v}+{var}" for v in ("en-us", "en-gb", "en-gb-scotland", "en-029") for var in ("m1", "m3", "f1", "f2"))
NEW_VOICE = "de+f4"  # the device's owner: a German voice (its English has a German accent), a variant the base never heard


@dataclass(frozen=True)
class Draw:
    """One clip's synthesis settings."""

    voice: str
    word: str
    speed: int  # words per minute
    pitch: int  # 0-99
    onset: float  # fraction of the free time before the word
    snr_db: float
    seed: int


def speak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """``word`` in ``voice`` as float32 at 16 kHz (espeak-ng, then sox to 16 kHz mono 16-bit)."""
    tts = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                         check=True, capture_output=True)
    wav = subprocess.run(["sox", "-t", "wav", "-", "-t", "wav", "-r", str(RATE), "-c", "1", "-b", "16", "-"],
                         input=tts.stdout, check=True, capture_output=True)
    with wave.open(io.BytesIO(wav.stdout)) as w:
        n = w.getnframes() if w.getnframes() < 2**31 - 1 else -1  # a piped WAV's header may not know its length
        return np.frombuffer(w.readframes(n if n > 0 else 10 * RATE), "<i2").astype(np.float32) / 32768.0


def clip(d: Draw) -> np.ndarray:
    """One second: the word (silence trimmed) at a random onset, plus white noise at ``snr_db``; int16."""
    x = speak(d.word, d.voice, d.speed, d.pitch)
    loud = np.flatnonzero(np.abs(x) > 0.02 * np.abs(x).max())
    x = x[loud[0]:loud[-1] + 1][:RATE]
    out = np.zeros(RATE, np.float32)
    start = int(d.onset * (RATE - len(x)))
    out[start:start + len(x)] = x
    rng = np.random.default_rng(d.seed)
    noise = rng.standard_normal(RATE).astype(np.float32)
    out += noise * np.sqrt(np.mean(x ** 2) / 10 ** (d.snr_db / 10))
    return np.clip(out * 32767, -32768, 32767).astype(np.int16)


def draws(voices: tuple[str, ...], per_voice_word: int, seed: int, words: tuple[str, ...] = WORDS) -> list[Draw]:
    """``per_voice_word`` random settings for every (voice, word)."""
    rng = np.random.default_rng(seed)
    return [Draw(v, w, int(rng.integers(120, 201)), int(rng.integers(20, 81)), float(rng.uniform()),
                 float(rng.uniform(10, 30)), int(rng.integers(2**31)))
            for v in voices for w in words for _ in range(per_voice_word)]


def write_set(root: Path, plan: list[Draw], workers: int = 2, synth: Callable[[Draw], np.ndarray] = clip) -> Path:
    """The clips of ``plan`` (int16 from ``synth``) as ``root/<word>/<i>.wav`` (built once: an existing ``root`` is reused)."""
    if root.is_dir():
        return root
    part = root.with_name(root.name + ".part")
    shutil.rmtree(part, ignore_errors=True)  # an interrupted earlier build
    with ThreadPoolExecutor(workers) as pool:
        clips = list(pool.map(synth, plan))
    for i, (d, x) in enumerate(zip(plan, clips)):
        (part / d.word).mkdir(parents=True, exist_ok=True)
        with wave.open(str(part / d.word / f"{i:05d}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(x.tobytes())
    part.rename(root)
    return root
