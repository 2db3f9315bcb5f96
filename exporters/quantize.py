"""Weight quantization in numpy: int8 per channel (symmetric) and int4 blockwise (symmetric).

Dequantization is ``q * scale`` exactly, which is what ONNX ``DequantizeLinear`` computes with a
zero point of 0, so torch references built from ``dequantize(...)`` see the same weights.
"""

from __future__ import annotations

import numpy as np

INT4_BLOCK = 32


def int8_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, scale float32 of shape w.shape[axis]); q * scale ≈ w with |error| ≤ scale/2."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def int4_blockwise(w: np.ndarray, axis: int, block: int = INT4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 holding values in [-7, 7], scale float32) with blocks of ``block`` along ``axis``.

    scale has w's shape with ``axis`` reduced to ceil(n / block), as ONNX blocked DequantizeLinear wants.
    """
    w = np.asarray(w, dtype=np.float32)
    w = np.moveaxis(w, axis, -1)
    n = w.shape[-1]
    nb = -(-n // block)
    padded = np.zeros((*w.shape[:-1], nb * block), np.float32)
    padded[..., :n] = w
    blocks = padded.reshape(*w.shape[:-1], nb, block)
    amax = np.abs(blocks).max(-1)
    scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -7, 7).astype(np.int8).reshape(*w.shape[:-1], nb * block)[..., :n]
    return np.moveaxis(q, -1, axis), np.moveaxis(scale, -1, axis)


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 raw data: two values a byte, the first in the low nibble."""
    flat = q.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    lo = flat[0::2].astype(np.uint8) & 0x0F
    hi = flat[1::2].astype(np.uint8) & 0x0F
    return (lo | (hi << 4)).astype(np.uint8).tobytes()


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int, block: int | None = None) -> np.ndarray:
    """Inverse of the quantizers above (exact ``q * scale`` in float32)."""
    if block is None:
        shape = [1] * q.ndim
        shape[axis] = -1
        return q.astype(np.float32) * scale.reshape(shape)
    s = np.repeat(scale, block, axis=axis)
    s = np.take(s, np.arange(q.shape[axis]), axis=axis)
    return q.astype(np.float32) * s
