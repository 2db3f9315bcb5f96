"""Labelled image data for an image-classification bundle: the same interface as runtime/data.py's Dataset.

Sources (by what the path is):
- a folder of class folders, ``root/<label>/<image>.png`` (Pillow decodes; the folders name the labels);
- a ``.csv`` label file with the columns ``image,label`` (image paths relative to the file);
- an IDX images file (``*-images-idx3-ubyte[.gz]``) beside its labels file (``*-labels-idx1-ubyte[.gz]``);
- a ``.npy`` images array beside ``<stem>.labels.npy``.
Labels are bundle label names or indices. Everything is checked before anything trains: an image that
does not decode, a label the bundle lacks, or data with a single class is a DataError naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepeft.errors import DataError
from edgepeft.manifest import Manifest
from edgepeft.names import IMAGE_CLS, LABELS, PIXEL_VALUES
from edgepeft.runtime.images import (IMAGE_SUFFIXES, Augment, ImageSpec, as_nhwc, decode_image, image_file, read_idx,
                                     read_npy, resize, to_model_input)
from edgepeft.runtime.labelled_files import digest, from_csv, from_folder, label_array


@dataclass
class ImageDataset:
    """uint8 images (N, H, W, C) and label indices; ``batch`` makes the model input, augmented when ``augment`` is set."""

    path: Path
    images: np.ndarray
    labels: np.ndarray
    spec: ImageSpec
    sha256: str
    augment: Augment | None = None
    seed: int = 0
    task: str = field(default=IMAGE_CLS)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.ones(len(self), np.int64)  # every image is one "token" long: no length buckets

    def batch(self, index: np.ndarray | list[int], max_length: int | None = None) -> dict[str, np.ndarray]:
        """The model input and labels of images ``index``; augmentation is seeded by the batch, so a resumed run repeats it."""
        index = np.asarray(index, np.int64)
        rng = np.random.default_rng([self.seed, *index.tolist()]) if self.augment else None
        return {PIXEL_VALUES: to_model_input(self.images[index], self.spec, self.augment, rng), LABELS: self.labels[index]}

    def subset(self, index: np.ndarray) -> "ImageDataset":
        """The images ``index`` as a data set of their own (benchmarks draw training sets of a chosen size)."""
        return ImageDataset(self.path, self.images[index], self.labels[index], self.spec, self.sha256 + f":{len(index)}",
                            self.augment, self.seed)


def _folder(root: Path, manifest: Manifest) -> tuple[list[np.ndarray], np.ndarray]:
    pairs = from_folder(root, manifest, IMAGE_SUFFIXES, "images")
    return [decode_image(f) for f, _ in pairs], np.array([y for _, y in pairs], np.int64)


def _csv(path: Path, manifest: Manifest) -> tuple[list[np.ndarray], np.ndarray]:
    pairs = from_csv(path, manifest, "image")
    return [image_file(f) for f, _ in pairs], np.array([y for _, y in pairs], np.int64)


def _arrays(path: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    if "-images-idx" in path.name:
        label_path = path.with_name(path.name.replace("-images-idx3", "-labels-idx1"))
        reader = read_idx
    else:
        label_path = path.with_name(path.stem + ".labels.npy")
        reader = read_npy
    if not label_path.is_file():
        raise DataError(f"{path}: no labels beside it; expected {label_path.name}")
    images, labels = reader(path), reader(label_path)
    return as_nhwc(images, str(path)), label_array(labels, len(images), manifest, label_path, "images")


def _stack(images: list[np.ndarray], spec: ImageSpec, where: str) -> np.ndarray:
    """One uint8 array: as stored when every image has one size, else each resized to the bundle's size."""
    images = [as_nhwc(a[None], where)[0] for a in images]
    if len({a.shape for a in images}) == 1:
        return np.stack(images)
    return np.stack([np.rint(resize(a[None], spec.height, spec.width)[0]).astype(np.uint8)
                     if a.shape[:2] != (spec.height, spec.width) else a for a in images])


def load_image_dataset(path: str | os.PathLike, manifest: Manifest, *, augment: Augment | None = None,
                       seed: int = 0, min_classes: int = 2) -> ImageDataset:
    """Read and check labelled images for this bundle (sources: the module docstring)."""
    path = Path(os.fspath(path))
    spec = ImageSpec.of(manifest)
    if path.is_dir():
        images, labels = _folder(path, manifest)
        images = _stack(images, spec, str(path)) if images else np.zeros((0, 1, 1, 1), np.uint8)
    elif not path.is_file():
        raise DataError(f"{path}: no such image folder or data file")
    elif path.suffix.lower() == ".csv":
        images, labels = _csv(path, manifest)
        images = _stack(images, spec, str(path)) if images else np.zeros((0, 1, 1, 1), np.uint8)
    elif "-images-idx" in path.name or path.suffix == ".npy":
        images, labels = _arrays(path, manifest)
    else:
        raise DataError(f"{path}: unknown image data; give a folder of class folders, an image,label .csv, "
                        "an IDX images file or a .npy images array")
    if len(labels) == 0:
        raise DataError(f"{path}: no images")
    if len(np.unique(labels)) < min_classes:
        raise DataError(f"{path}: every image is labelled {manifest.labels[int(labels[0])]!r}; "
                        f"a classifier learns nothing from one class, give images of at least {min_classes}")
    return ImageDataset(path, images, labels, spec, digest(path), augment, seed)
