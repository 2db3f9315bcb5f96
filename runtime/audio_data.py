"""Labelled audio clips for an audio-classification bundle: the same interface as runtime/image_data.py's ImageDataset.

Sources (by what the path is): a folder of word folders, ``root/<word>/<clip>.wav`` (the folders name the
labels), or a ``.csv`` label file with the columns ``audio,label`` (paths relative to the file). Every clip is
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
from edgepeft.runtime.labelled_files import digest, from_csv, from_folder

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
    if path.is_dir():
        pairs = from_folder(path, manifest, AUDIO_SUFFIXES, "WAV files")
    elif path.is_file() and path.suffix.lower() == ".csv":
        pairs = from_csv(path, manifest, "audio")
    elif path.is_file():
        raise DataError(f"{path}: unknown audio data; give a folder of word folders (word/clip.wav) or an audio,label .csv")
    else:
        raise DataError(f"{path}: no such audio folder or label file")
    if not pairs:
        raise DataError(f"{path}: no WAV files")
    labels = np.array([y for _, y in pairs], np.int64)
    if len(np.unique(labels)) < min_classes:
        raise DataError(f"{path}: every clip is labelled {manifest.labels[int(labels[0])]!r}; "
                        f"a classifier learns nothing from one class, give clips of at least {min_classes}")
    features = np.concatenate([model_input(np.stack([read_wav(f, spec) for f, _ in pairs[i:i + _CLIPS]]), spec)
                               for i in range(0, len(pairs), _CLIPS)])  # a few clips' waves in memory at a time
    return AudioDataset(path, features, labels, spec, digest(path))
