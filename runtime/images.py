"""Images on the device, numpy only: read IDX and .npy arrays, decode PNG/JPEG (Pillow, the ``vision`` extra),
resize, random crop and flip, normalize into the (B, C, H, W) float32 a bundle's ``pixel_values`` takes.

Images are kept as uint8 (N, H, W, C) at their stored size and turned into model input one batch at a
time, so a data set costs its bytes, not its float32 copies at the model's resolution.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.errors import DataError
from edgepeft.manifest import Manifest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_IDX_BYTES = 1 << 31  # 2 GiB: far above any image set a device trains on, far below a gzip bomb's output
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class ImageSpec:
    """What a bundle's model takes: channels, size, and the per-channel normalization of pixels in [0, 1]."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, manifest: Manifest) -> "ImageSpec":
        i = manifest.extra.get("image")
        if not isinstance(i, dict):
            raise DataError(f"the bundle is a {manifest.task} bundle; image data needs an image-classification bundle")
        return cls(int(i["channels"]), int(i["height"]), int(i["width"]), tuple(i["mean"]), tuple(i["std"]))


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation: a random crop after padding each side by ``crop_pad`` pixels, a random horizontal flip."""

    crop_pad: int = 0
    flip: bool = False


def read_idx(path: Path, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """An IDX array (MNIST's format, gzipped or not), read as a stream: a file decompresses only as far as its
    header's size (at most ``max_bytes``), so a gzip bomb or a lying header costs bounded memory."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_TYPES or not 1 <= magic[3] <= 4:
                raise DataError(f"{path}: not an IDX file (bad magic number)")
            ndim, dtype = magic[3], np.dtype(_IDX_TYPES[magic[2]])
            head = f.read(4 * ndim)
            dims = tuple(int(d) for d in np.frombuffer(head, ">u4", len(head) // 4))
            size = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            if len(dims) != ndim or size > max_bytes:
                raise DataError(f"{path}: IDX header says {dims} of {dtype}: " +
                                ("truncated" if len(dims) != ndim else f"{size:,} bytes, above the {max_bytes:,}-byte limit"))
            data = f.read(size + 1)  # one byte more: data after the array is a lie of the header too
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot be read as IDX ({e})") from None
    if len(data) != size:
        raise DataError(f"{path}: IDX header says {dims} of {dtype}, the file holds {'more than ' * (len(data) > size)}"
                        f"{min(len(data), size)} data bytes")
    return np.frombuffer(data, dtype).reshape(dims)


def read_npy(path: Path) -> np.ndarray:
    """A .npy array (no pickles)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot be read as .npy ({str(e).splitlines()[0]})") from None


def decode_image(path: Path) -> np.ndarray:
    """A PNG/JPEG/... file as uint8 (H, W, C) with Pillow (``pip install "edgepeft[vision]"``)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError(f"{path}: decoding images needs Pillow; pip install \"edgepeft[vision]\", or give IDX/.npy arrays") from None
    try:
        with Image.open(path) as im:
            im = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:  # a bomb: before decoding
        raise DataError(f"{path}: not a decodable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return a[:, :, None] if a.ndim == 2 else a


def image_file(path: Path) -> np.ndarray:
    """One image as uint8 (H, W, C) from an image file or a .npy array."""
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    a = read_npy(path) if path.suffix.lower() == ".npy" else decode_image(path)
    return as_nhwc(a[None], str(path))[0]


def as_nhwc(images: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 images; floats in [0, 1] are scaled to uint8."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or 0 in images.shape:
        raise DataError(f"{where}: images of shape {images.shape}; expected (N, H, W) or (N, H, W, C) with C 1, 3 or 4")
    if images.dtype.kind == "f":
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise DataError(f"{where}: float images must lie in [0, 1]")
        return np.rint(images * 255).astype(np.uint8)
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images of dtype {images.dtype}; expected uint8, or floats in [0, 1]")
    return images


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # half-pixel centres (PIL's and torch's align_corners=False): source = (i + 0.5) * n_in / n_out - 0.5
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _interpolation(n_in: int, n_out: int) -> np.ndarray:
    """Bilinear resampling of one axis as an (n_out, n_in) matrix: two weights a row. Made once per pair of sizes (a
    training run asks for the same two every batch), read-only since it is shared."""
    lo, hi, f = _axis_weights(n_in, n_out)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1 - f)
    np.add.at(m, (np.arange(n_out), hi), f)
    m.flags.writeable = False
    return m


def _resize_planes(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of float32 (N, C, H, W) planes: two small matrix products, far faster than gathering."""
    if planes.shape[2:] == (height, width):
        return planes
    return _interpolation(planes.shape[2], height) @ planes @ _interpolation(planes.shape[3], width).T


def resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (N, H, W, C) images to (N, height, width, C), float32."""
    planes = np.moveaxis(images, -1, 1).astype(np.float32)
    return np.moveaxis(_resize_planes(planes, height, width), 1, -1)


def match_channels(planes: np.ndarray, channels: int) -> np.ndarray:
    """(N, C, H, W) planes with the bundle's channels: alpha dropped, RGB to gray by the mean. Gray for an RGB
    bundle stays one plane: normalization writes it into each channel, so it is never copied three times."""
    c = planes.shape[1]
    if c == 4:
        planes, c = planes[:, :3], 3
    if c == channels or c == 1:
        return planes
    if channels == 1:
        return planes.mean(1, keepdims=True)
    raise DataError(f"images have {c} channels, the bundle takes {channels}")


def augment(planes: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Random crop (zero padding of ``crop_pad``) and horizontal flip, per image of (N, C, H, W) planes."""
    n, _, h, w = planes.shape
    if aug.crop_pad:
        p = aug.crop_pad
        padded = np.pad(planes, ((0, 0), (0, 0), (p, p), (p, p)))
        dy, dx = rng.integers(0, 2 * p + 1, n), rng.integers(0, 2 * p + 1, n)
        planes = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if aug.flip:
        flip = rng.random(n) < 0.5
        planes = np.where(flip[:, None, None, None], planes[..., ::-1], planes)
    return planes


def to_model_input(images: np.ndarray, spec: ImageSpec, aug: Augment | None = None,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) images -> the bundle's normalized float32 (N, channels, height, width).

    Works on (N, C, H, W) planes from the start and normalizes with one multiply-add per channel written straight
    into the output: a gray image is resized, augmented and scaled as one plane, then broadcast per channel."""
    planes = match_channels(np.moveaxis(images, -1, 1).astype(np.float32), spec.channels)
    planes = _resize_planes(planes, spec.height, spec.width)
    if aug is not None and rng is not None:
        planes = augment(planes, aug, rng)
    std = np.asarray(spec.std, np.float32)
    scale, shift = 1 / (np.float32(255.0) * std), -np.asarray(spec.mean, np.float32) / std
    out = np.empty((len(planes), spec.channels, spec.height, spec.width), np.float32)
    for k in range(spec.channels):
        np.multiply(planes[:, k if planes.shape[1] > 1 else 0], scale[k], out=out[:, k])
        out[:, k] += shift[k]
    return out
