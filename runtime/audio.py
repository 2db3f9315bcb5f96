"""Audio on the device, numpy only: read 16-bit PCM WAV with the standard library's ``wave``, and compute the
log-mel features an audio bundle's ``input_features`` takes.

Features are computed here, not inside the exported graph: a clip's features are computed once when the
data is read and reused every epoch (the graph would redo the STFT at every step), the CNN export stays the
image one, and the STFT needs no ONNX DFT support from the training graph. tests/test_audio.py checks them
against torch.stft and a torch filterbank on the same waves. A ``waveform`` bundle (a pitch CNN that takes one
frame of raw samples, exporters/crepe.py) takes the samples as read; its frame normalization is inside its graph.

A WAV at another sample rate or with more than one channel is refused, naming the file and the sox command
that converts it: resampling well needs an anti-aliasing filter the device should not guess at.
"""

from __future__ import annotations

import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgepeft.errors import DataError
from edgepeft.manifest import Manifest

AUDIO_SUFFIXES = (".wav",)
LOG_MEL, WAVEFORM = "log-mel", "waveform"  # what the graph takes: log-mel features, or the clip's raw samples
LOG_FLOOR = 1e-6  # log(mel power + LOG_FLOOR): silence is finite
_CHUNK = 16  # clips per STFT pass: bounds the float64 (clips, frames, n_fft) scratch arrays (~3 MB each)


@dataclass(frozen=True)
class AudioSpec:
    """What an audio bundle's model takes: clips of ``samples`` at ``sample_rate`` Hz, as normalized log-mel frames."""

    sample_rate: int = 16000
    samples: int = 16000  # clip length; a longer WAV is cut after it, a shorter one padded with silence
    n_fft: int = 400  # 25 ms periodic Hann window
    hop: int = 160  # 10 ms
    mels: int = 40
    fmin: float = 20.0
    fmax: float = 8000.0
    mean: float = 0.0  # normalization of the log-mel values
    std: float = 1.0
    features: str = LOG_MEL  # WAVEFORM: the graph takes the samples as they are (B, 1, samples, 1) (a pitch CNN's frame)

    @property
    def frames(self) -> int:
        return 1 + (self.samples - self.n_fft) // self.hop

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one clip's model input."""
        return (1, self.samples, 1) if self.features == WAVEFORM else (1, self.mels, self.frames)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, manifest: Manifest) -> "AudioSpec":
        a = manifest.extra.get("audio")
        if not isinstance(a, dict):
            raise DataError(f"the bundle is a {manifest.task} bundle; audio data needs an audio-classification bundle")
        try:
            spec = cls(**a)
        except TypeError:
            raise DataError(f"the bundle's audio settings {sorted(a)} are not {sorted(cls.__dataclass_fields__)}; "
                            "re-export it with this edgepeft") from None
        if spec.features not in (LOG_MEL, WAVEFORM):
            raise DataError(f"the bundle's audio features {spec.features!r} are neither {LOG_MEL!r} nor {WAVEFORM!r}; "
                            "re-export it with this edgepeft")
        return spec


def read_wav(path: Path, spec: AudioSpec) -> np.ndarray:
    """One clip as float32 (spec.samples,) in [-1, 1); reads at most one clip's bytes whatever the header claims."""
    if not path.is_file():
        raise DataError(f"{path}: no such WAV file")
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            if rate != spec.sample_rate or channels != 1:
                raise DataError(f"{path}: {rate} Hz with {channels} channel(s); the bundle takes {spec.sample_rate} Hz mono "
                                f"and the device does not resample (convert it: sox IN -r {spec.sample_rate} -c 1 -b 16 OUT.wav)")
            if width != 2:
                raise DataError(f"{path}: {8 * width}-bit samples; the bundle takes 16-bit PCM (sox IN -b 16 OUT.wav)")
            want = min(n, spec.samples)
            raw = w.readframes(want)
    except (wave.Error, EOFError, OSError, ValueError) as e:  # wave.Error: not RIFF/WAVE or not PCM; EOFError: cut short
        raise DataError(f"{path}: not a readable WAV file ({str(e) or type(e).__name__})") from None
    if want == 0:
        raise DataError(f"{path}: a WAV with no samples")
    if len(raw) < 2 * want:
        raise DataError(f"{path}: truncated; its header says {n} samples, the file holds {len(raw) // 2}")
    x = np.zeros(spec.samples, np.float32)
    x[:want] = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    return x


def mel_filterbank(spec: AudioSpec) -> np.ndarray:
    """(mels, n_fft // 2 + 1) triangles on the HTK mel scale, peak 1, no area normalization."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)

    hz = 700.0 * (10.0 ** (np.linspace(mel(spec.fmin), mel(spec.fmax), spec.mels + 2) / 2595.0) - 1.0)
    bins = np.linspace(0.0, spec.sample_rate / 2, spec.n_fft // 2 + 1)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    return np.maximum(0.0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))


def model_input(waves: np.ndarray, spec: AudioSpec) -> np.ndarray:
    """(N, samples) float waves -> the graph input (N, 1, H, W): log-mel features, or the waves themselves."""
    if spec.features == WAVEFORM:
        return np.asarray(waves, np.float32).reshape(-1, 1, spec.samples, 1)
    return log_mel(waves, spec)


def log_mel(waves: np.ndarray, spec: AudioSpec) -> np.ndarray:
    """(N, samples) float waves -> normalized log-mel features (N, 1, mels, frames) float32 (float64 inside)."""
    waves = np.asarray(waves, np.float64).reshape(-1, spec.samples)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(spec.n_fft) / spec.n_fft)  # periodic Hann
    frames = np.arange(spec.n_fft)[None, :] + spec.hop * np.arange(spec.frames)[:, None]  # (F, n_fft) sample index
    fbank = mel_filterbank(spec).T  # (bins, mels)
    out = np.empty((len(waves), 1, spec.mels, spec.frames), np.float32)
    for i in range(0, len(waves), _CHUNK):
        power = np.abs(np.fft.rfft(waves[i:i + _CHUNK, frames] * window, axis=-1)) ** 2  # (n, F, bins)
        feats = np.log(power @ fbank + LOG_FLOOR)  # (n, F, mels)
        out[i:i + _CHUNK, 0] = ((feats - spec.mean) / spec.std).transpose(0, 2, 1)
    return out
