"""The device's image pipeline (numpy only): readers, resize, channels, augmentation, normalization, bad input."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from edgepeft.errors import DataError
from edgepeft.runtime.images import Augment, ImageSpec, augment, decode_image, read_idx, resize, to_model_input


def idx_bytes(a: np.ndarray) -> bytes:
    return b"\0\0\x08" + bytes([a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def test_idx_reads_gzipped_and_plain_files(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 6)).astype(np.uint8)
    (tmp_path / "x-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(a)))
    (tmp_path / "x-images-idx3-ubyte").write_bytes(idx_bytes(a))
    np.testing.assert_array_equal(read_idx(tmp_path / "x-images-idx3-ubyte.gz"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-images-idx3-ubyte"), a)


def test_idx_with_a_header_that_lies_about_its_size_is_refused(tmp_path):
    a = np.zeros((5, 4, 4), np.uint8)
    (tmp_path / "bad").write_bytes(idx_bytes(a)[:-3])
    with pytest.raises(DataError, match=r"bad: IDX header says \(5, 4, 4\)"):
        read_idx(tmp_path / "bad")


def test_gzipped_idx_decompresses_only_as_far_as_its_header_allows(tmp_path):
    a = np.zeros((5, 4, 4), np.uint8)
    (tmp_path / "bomb.gz").write_bytes(gzip.compress(idx_bytes(a) + bytes(50_000_000)))  # 50 MB behind 80 bytes
    with pytest.raises(DataError, match=r"bomb.gz: IDX header says \(5, 4, 4\) of uint8, the file holds more than 80"):
        read_idx(tmp_path / "bomb.gz")
    big = np.zeros((1000, 10, 10), np.uint8)
    (tmp_path / "big.gz").write_bytes(gzip.compress(idx_bytes(big)))
    with pytest.raises(DataError, match="100,000 bytes, above the 1,000-byte limit"):
        read_idx(tmp_path / "big.gz", max_bytes=1000)


def test_bilinear_resize_matches_torch_interpolate():
    x = np.random.default_rng(1).integers(0, 256, (2, 28, 28, 3)).astype(np.uint8)
    for h, w in ((64, 64), (17, 40)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=(h, w),
                                              mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(resize(x, h, w), ref, atol=1e-3)


def test_model_input_is_normalized_nchw_with_gray_repeated_to_rgb():
    spec = ImageSpec(3, 4, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    gray = np.full((2, 4, 4, 1), 255, np.uint8)
    x = to_model_input(gray, spec)
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x, 2.0)  # (1 - 0.5) / 0.25


def test_model_input_matches_torch_resize_channels_and_normalize():
    rng = np.random.default_rng(2)
    for channels, stored in ((3, 1), (3, 3), (3, 4), (1, 3), (1, 1)):
        spec = ImageSpec(channels, 20, 24, (0.485, 0.456, 0.406)[:channels], (0.229, 0.224, 0.225)[:channels])
        x = rng.integers(0, 256, (3, 28, 28, stored)).astype(np.uint8)
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float()[:, :3]
        t = t.mean(1, keepdim=True) if channels == 1 else t.expand(-1, 3, -1, -1)
        t = torch.nn.functional.interpolate(t, size=(20, 24), mode="bilinear", align_corners=False) / 255
        ref = (t - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
        np.testing.assert_allclose(to_model_input(x, spec), ref.numpy(), atol=1e-4)


def test_flip_mirrors_and_crop_shifts_within_the_padding():
    x = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3)  # (N, C, H, W) planes
    flipped = augment(x, Augment(flip=True), np.random.default_rng(0))
    for a, b in zip(flipped, x):
        assert np.array_equal(a, b) or np.array_equal(a, b[..., ::-1])
    cropped = augment(x, Augment(crop_pad=1), np.random.default_rng(0))
    assert cropped.shape == x.shape
    for a, b in zip(cropped, x):  # every kept pixel is a pixel of the image, shifted by at most 1
        assert set(a.ravel()) - {0.0} <= set(b.ravel())


def test_an_image_that_does_not_decode_is_named(tmp_path):
    bad = tmp_path / "cat.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"cat\.png: not a decodable image"):
        decode_image(bad)


def test_an_image_too_large_to_decode_safely_is_refused_in_one_line(tmp_path, monkeypatch):
    # Pillow refuses a decompression bomb (more than 2x MAX_IMAGE_PIXELS) before decoding; say so per file.
    from PIL import Image

    big = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000
    with pytest.raises(DataError, match=r"bomb\.png: not a decodable image") as e:
        decode_image(big)
    assert "\n" not in str(e.value)
