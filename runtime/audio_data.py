"""Labelled audio clips for an audio-classification bundle: the same interface as runtime/image_data.py's ImageDataset.

Sources (by what the path is): a folder of word folders, ``root/<word>/<clip>.wav`` (the folders name the
labels), a ``.csv`` label file with the columns ``audio,label`` (paths relative to the file), or a ``.npy`` array
of clips (N, samples), float in [-1, 1] or int16 PCM at the bundle's rate, beside ``<stem>.labels.npy`` (label
indices; a pitch bundle's frames come this way as well as WAV files). Every clip is
read and turned into log-mel features once, when the data is loaded (runtime/audio.py); a clip that is not a
16 kHz mono 16-bit WAV, a label the bundle lacks, or data of a single class is a DataError naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepeft.errors import DataError
from edgepeft.manifest import Manifest
from edgepeft.names import AUDIO_CLS, INPUT_FEATURES, LABELS
from edgepeft.runtime.audio import AUDIO_SUFFIXES, AudioSpec, model_input, read_wav
from edgepeft.runtime.images import read_npy
from edgepeft.runtime.labelled_files import digest, from_csv, from_folder, label_array

_CLIPS = 32  # clips read per feature pass (their float32 waves are the transient memory: 2 MB)


@dataclass
class AudioDataset:
    """Model inputs (log-mel features (N, 1, mels, frames), or waves (N, 1, samples, 1)) float32 and label indices."""

    path: Path
    features: np.ndarray
    labels: np.ndarray
    spec: AudioSpec
    sha256: str
    task: str = field(default=AUDIO_CLS)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.ones(len(self), np.int64)  # every clip is one "token" long: no length buckets

    def batch(self, index: np.ndarray | list[int], max_length: int | None = None) -> dict[str, np.ndarray]:
        """The model input and labels of clips ``index``."""
        index = np.asarray(index, np.int64)
        return {INPUT_FEATURES: self.features[index], LABELS: self.labels[index]}

    def subset(self, index: np.ndarray) -> "AudioDataset":
        """The clips ``index`` as a data set of their own."""
        return AudioDataset(self.path, self.features[index], self.labels[index], self.spec, self.sha256 + f":{len(index)}")


def load_audio_dataset(path: str | os.PathLike, manifest: Manifest, *, min_classes: int = 2) -> AudioDataset:
    """Read and check labelled clips for this bundle (sources: the module docstring)."""
    path = Path(os.fspath(path))
    spec = AudioSpec.of(manifest)
    if path.is_file() and path.suffix.lower() == ".npy":
        waves, labels = _arrays(path, manifest, spec)
        _check_classes(path, labels, manifest, min_classes)
        features = np.concatenate([model_input(waves[i:i + _CLIPS], spec) for i in range(0, len(waves), _CLIPS)])
        return AudioDataset(path, features, labels, spec, digest(path))
    if path.is_dir():
        pairs = from_folder(path, manifest, AUDIO_SUFFIXES, "WAV files")
    elif path.is_file() and path.suffix.lower() == ".csv":
        pairs = from_csv(path, manifest, "audio")
    elif path.is_file():
        raise DataError(f"{path}: unknown audio data; give a folder of word folders (word/clip.wav), an audio,label .csv "
                        "or a .npy array of clips")
    else:
        raise DataError(f"{path}: no such audio folder or label file")
    if not pairs:
        raise DataError(f"{path}: no WAV files")
    labels = np.array([y for _, y in pairs], np.int64)
    _check_classes(path, labels, manifest, min_classes)
    features = np.concatenate([model_input(np.stack([read_wav(f, spec) for f, _ in pairs[i:i + _CLIPS]]), spec)
                               for i in range(0, len(pairs), _CLIPS)])  # a few clips' waves in memory at a time
    return AudioDataset(path, features, labels, spec, digest(path))


def _arrays(path: Path, manifest: Manifest, spec: AudioSpec) -> tuple[np.ndarray, np.ndarray]:
    """Clips (N, samples) as float32 in [-1, 1] and their checked label indices, from a .npy pair."""
    label_path = path.with_name(path.stem + ".labels.npy")
    if not label_path.is_file():
        raise DataError(f"{path}: no labels beside it; expected {label_path.name}")
    waves = read_npy(path)
    if waves.ndim != 2 or waves.shape[1] != spec.samples or len(waves) == 0:
        raise DataError(f"{path}: clips of shape {waves.shape}; the bundle takes (clips, {spec.samples}) samples at "
                        f"{spec.sample_rate} Hz")
    if waves.dtype == np.int16:
        waves = waves.astype(np.float32) / 32768.0
    elif waves.dtype.kind != "f":
        raise DataError(f"{path}: clips of dtype {waves.dtype}; give float samples in [-1, 1] or int16 PCM")
    elif not np.isfinite(waves).all():
        raise DataError(f"{path}: clips with NaN or Inf samples")
    labels = label_array(read_npy(label_path), len(waves), manifest, label_path, "clips")
    return waves.astype(np.float32, copy=False), labels


def _check_classes(path: Path, labels: np.ndarray, manifest: Manifest, min_classes: int) -> None:
    if len(np.unique(labels)) < min_classes:
        raise DataError(f"{path}: every clip is labelled {manifest.labels[int(labels[0])]!r}; "
                        f"a classifier learns nothing from one class, give clips of at least {min_classes}")
