"""Max pooling and its gradient as strided slices and elementwise ops, for tracing a CNN's training step to ONNX.

The exporter writes ``aten.max_pool2d_with_indices`` as an ONNX MaxPool that returns indices, plus a second 1x1
MaxPool over the whole input to turn onnxruntime's flat indices into torch's per-plane ones, and its backward as a
ScatterElements of the gradient at those indices. onnxruntime runs that slowly: on the KWS CNN's train step
(3 pools, batch 16, one thread) MaxPool and ScatterElements were a third of the step's kernel time, more than the
convolutions' backward (onnxruntime's profiler, benchmarks/bench_cnn_profile.py).

For the pooling CNNs use (the window equals the stride, no padding or dilation), no indices are needed: the
output is the elementwise maximum of the k_h x k_w strided slices of the input, and the gradient goes to the
first slice, in window order, that equals it, which is the element torch's index points at (its first maximum),
so ties are broken as torch breaks them. Other poolings are left to the exporter as they were.
"""

from __future__ import annotations

from typing import Callable

import torch

aten = torch.ops.aten


def _window(kernel_size, stride, padding, dilation, ceil_mode) -> tuple[int, int] | None:
    """(k_h, k_w) when the pooling is one this module rewrites (window = stride, no padding, dilation or ceil), else None."""
    k = tuple(kernel_size) * (2 // len(kernel_size))
    s = (tuple(stride) * (2 // len(stride))) if stride else k
    p = tuple(padding) * (2 // len(padding)) if isinstance(padding, (list, tuple)) else (padding, padding)
    d = tuple(dilation) * (2 // len(dilation)) if isinstance(dilation, (list, tuple)) else (dilation, dilation)
    return k if s == k and p == (0, 0) and d == (1, 1) and not ceil_mode else None


def _slices(x: torch.Tensor, k: tuple[int, int]) -> list[torch.Tensor]:
    """The k_h * k_w strided slices of ``x`` (cut to whole windows), in window order (row-major)."""
    h, w = (x.shape[2] // k[0]) * k[0], (x.shape[3] // k[1]) * k[1]
    return [x[:, :, u:h:k[0], v:w:k[1]] for u in range(k[0]) for v in range(k[1])]


def _window_max(parts: list[torch.Tensor]) -> torch.Tensor:
    """The elementwise maximum of a window's slices: the pooled output."""
    out = parts[0]
    for p in parts[1:]:
        out = torch.maximum(out, p)
    return out


def max_pool2d_with_indices(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    """Max pooling as the maximum of strided slices; the indices are a placeholder the backward below never reads."""
    k = _window(kernel_size, stride, padding, dilation, ceil_mode)
    if k is None or x.dim() != 4:
        return NotImplemented
    out = _window_max(_slices(x, k))
    return out, torch.zeros_like(out, dtype=torch.int64)


def max_pool2d_with_indices_backward(grad_out, x, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """The gradient to each window's first maximum (torch's index), placed back by a reshape instead of a scatter."""
    k = _window(kernel_size, stride, padding, dilation, ceil_mode)
    if k is None or x.dim() != 4:
        return NotImplemented
    parts = _slices(x, k)
    out = _window_max(parts)
    taken = torch.zeros_like(out, dtype=torch.bool)
    planes = []
    for p in parts:  # window order: a later equal element gets nothing once an earlier one took the gradient
        first = (p == out) & ~taken
        taken = taken | first
        planes.append(torch.where(first, grad_out, torch.zeros_like(grad_out)))
    n, c, ho, wo = grad_out.shape
    g = torch.stack(planes, -1).reshape(n, c, ho, wo, k[0], k[1]).permute(0, 1, 2, 4, 3, 5).reshape(n, c, ho * k[0], wo * k[1])
    if (ho * k[0], wo * k[1]) == tuple(x.shape[2:]):
        return g  # whole windows: no pad (onnxruntime copies the whole gradient for a pad of zeros)
    # rows and columns past the last whole window (floor mode) got no output, so no gradient
    return torch.nn.functional.pad(g, (0, x.shape[3] - wo * k[1], 0, x.shape[2] - ho * k[0]))


def decompositions() -> dict[object, Callable]:
    """The decomposition table entries for the tracer (exporters/trace.py adds them to the core decompositions)."""
    return {aten.max_pool2d_with_indices.default: max_pool2d_with_indices,
            aten.max_pool2d_with_indices_backward.default: max_pool2d_with_indices_backward}
