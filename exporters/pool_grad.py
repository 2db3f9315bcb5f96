"""Max pooling and its gradient for tracing a CNN's training step to ONNX: a plain MaxPool, indices from comparisons,
and the gradient scattered by one MaxUnpool.

The exporter writes ``aten.max_pool2d_with_indices`` as an ONNX MaxPool that returns indices, plus a second 1x1
MaxPool over the whole input to turn onnxruntime's flat indices into torch's per-plane ones, and its backward as a
ScatterElements of the gradient at those indices. onnxruntime runs that slowly: on the KWS CNN's train step
(3 pools, batch 16, one thread) MaxPool and ScatterElements were a third of the step's kernel time, more than the
convolutions' backward (onnxruntime's profiler, benchmarks/bench_cnn_profile.py). Its MaxPool with indices alone
takes 4.4 ms on the KWS CNN's first map (batch 16: 16 x 40 x 98), its MaxPool without them 0.2 ms.

For the pooling CNNs use (the window equals the stride, no padding or dilation) ``max_pool`` writes: the MaxPool
without indices; the pooled map upsampled back (Resize, nearest) and compared with the input, so each element knows
whether it is its window's maximum; the maxima times a constant map of each element's distance to the end of its
window (the rest 0), and a second MaxPool of that picks each window's largest distance: its first maximum in row-major
order, which is torch's index, so ties are broken as torch breaks them. Both MaxPools and the Resize see one channel
per plane (a free reshape), so onnxruntime does not reorder the full-size maps to and from its blocked (NCHWc) layout
for them (given channels, it reordered the pooled map's input and the upsampled map: ~0.4 ms a step). The backward
pass scatters the gradient at those indices with one ONNX MaxUnpool (``unpool``), which fills zeros and writes each
value once. Before, both passes worked on the k_h x k_w strided slices of the input (Slice with steps, which
onnxruntime copies one element at a time: 1.25 ms for the first map's four slices and their maximum), and the backward
masked the gradient once per window element and interleaved the planes (Where, Concat, Transpose, and a Pad where the
window does not divide the map). The KWS CNN's train step (batch 16, one thread): BN + head 15.9 -> 13.6 ms of CPU
(benchmarks/results/speech_session3.json; the operators in speech_profile3.json). The single-operator timings above
are onnxruntime 1.31 on one thread, measured alone on that map.
Other poolings are left to the exporter as they were.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

aten = torch.ops.aten

MAX_PLANE = 1 << 23  # flat indices (and halves) ride in float32 through the second MaxPool: exact below 2**23


def _window(kernel_size, stride, padding, dilation, ceil_mode) -> tuple[int, int] | None:
    """(k_h, k_w) when the pooling is one this module rewrites (window = stride, no padding, dilation or ceil), else None."""
    k = tuple(kernel_size) * (2 // len(kernel_size))
    s = (tuple(stride) * (2 // len(stride))) if stride else k
    p = tuple(padding) * (2 // len(padding)) if isinstance(padding, (list, tuple)) else (padding, padding)
    d = tuple(dilation) * (2 // len(dilation)) if isinstance(dilation, (list, tuple)) else (dilation, dilation)
    return k if s == k and p == (0, 0) and d == (1, 1) and not ceil_mode else None


def _first_index_maps(h: int, w: int, k: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Constant float32 maps for ``max_pool_onnx``: over the whole windows (1, 1, Hc, Wc), each element's distance to
    past its window's last element, ``last + 1/2 - index`` (flat indices in the (h, w) plane; the window's first
    element farthest); per window (1, 1, Ho, Wo), ``last + 1/2``."""
    hc, wc = (h // k[0]) * k[0], (w // k[1]) * k[1]
    rows, cols = np.arange(hc)[:, None], np.arange(wc)[None, :]
    last = ((rows // k[0]) * k[0] + k[0] - 1) * w + (cols // k[1]) * k[1] + k[1] - 1 + 0.5
    return (last - (rows * w + cols)).astype(np.float32)[None, None], last[::k[0], ::k[1]].astype(np.float32)[None, None]


@torch.library.custom_op("edgepeft::max_pool", mutates_args=())
def max_pool(x: torch.Tensor, kh: int, kw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k_h x k_w max pooling with stride = window and torch's indices (flat in each plane, first maximum)."""
    out, index = aten.max_pool2d_with_indices.default(x, [kh, kw], [kh, kw])
    return out, index


@max_pool.register_fake
def _(x, kh, kw):
    shape = (x.shape[0], x.shape[1], x.shape[2] // kh, x.shape[3] // kw)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


def max_pool_onnx(x, kh: int, kw: int):
    """``max_pool`` in ONNX (module docstring): MaxPool; Resize, Equal, a product with a constant map; MaxPool."""
    import onnx
    from onnxscript import opset18 as op

    c, h, w = (int(d) for d in x.shape[1:])  # static: only the batch is dynamic in the train graph
    ho, wo, hc, wc = h // kh, w // kw, (h // kh) * kh, (w // kw) * kw
    # one channel per plane, here and below: onnxruntime then pools, resizes and pools again on the plain layout
    # instead of reordering the full-size maps to and from its blocked (NCHWc) one (MaxPool's indices output is unused)
    top, _ = op.MaxPool(op.Reshape(x, op.Constant(value_ints=[-1, 1, h, w])), kernel_shape=[kh, kw], strides=[kh, kw])
    planes, top = top, op.Reshape(top, op.Constant(value_ints=[-1, c, ho, wo]))
    whole = x if (hc, wc) == (h, w) else op.Slice(x, op.Constant(value_ints=[0, 0]), op.Constant(value_ints=[hc, wc]),
                                                   op.Constant(value_ints=[2, 3]))
    up = op.Reshape(op.Resize(planes, None, op.Constant(value_floats=[1.0, 1.0, float(kh), float(kw)]), mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                    op.Constant(value_ints=[-1, c, hc, wc]))
    dist, last = (op.Constant(value=onnx.numpy_helper.from_array(m)) for m in _first_index_maps(h, w, (kh, kw)))
    # each window's maxima keep their distance, the rest 0: the largest distance is the first maximum's
    far = op.Mul(op.Cast(op.Equal(whole, up), to=onnx.TensorProto.FLOAT), dist)
    best, _ = op.MaxPool(op.Reshape(far, op.Constant(value_ints=[-1, 1, hc, wc])), kernel_shape=[kh, kw], strides=[kh, kw])
    # exact in float32 below 2**23; a window with no equal element (NaN) gets its last element's index, in bounds
    first = op.Sub(last, op.Reshape(best, op.Constant(value_ints=[-1, c, ho, wo])))
    return top, op.Cast(first, to=onnx.TensorProto.INT64)


def max_pool2d_with_indices(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    """Max pooling and torch's indices as ``max_pool`` (an ONNX MaxPool and a second one for the indices)."""
    k = _window(kernel_size, stride, padding, dilation, ceil_mode)
    if k is None or x.dim() != 4 or int(x.shape[2]) * int(x.shape[3]) >= MAX_PLANE:
        return NotImplemented
    return max_pool(x, *k)


@torch.library.custom_op("edgepeft::unpool", mutates_args=())
def unpool(grad: torch.Tensor, index: torch.Tensor, size_h: int, size_w: int) -> torch.Tensor:
    """(N, C, Ho, Wo) -> (N, C, size_h, size_w): each value at ``index``, a flat index into the whole output (ONNX
    MaxUnpool's convention; torch's indices are per plane), zeros elsewhere."""
    n, c = grad.shape[:2]
    out = grad.new_zeros(n * c * size_h * size_w)
    return out.index_put((index.reshape(-1),), grad.reshape(-1)).reshape(n, c, size_h, size_w)


@unpool.register_fake
def _(grad, index, size_h, size_w):
    return grad.new_empty(grad.shape[0], grad.shape[1], size_h, size_w)


def unpool_onnx(grad, index, size_h: int, size_w: int):
    """``unpool`` in ONNX: MaxUnpool with the output shape given."""
    from onnxscript import opset18 as op

    shape = op.Concat(op.Slice(op.Shape(grad), op.Constant(value_ints=[0]), op.Constant(value_ints=[2])),
                      op.Constant(value_ints=[size_h, size_w]), axis=0)
    # with an output shape given, onnxruntime writes each value at its flat index; kernel and strides only type the node
    return op.MaxUnpool(grad, index, shape, kernel_shape=[1, 1], strides=[1, 1])


def max_pool2d_with_indices_backward(grad_out, x, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """The gradient to each window's first maximum (torch's index), scattered into zeros by one MaxUnpool; rows and
    columns past the last whole window (floor mode) got no output, so no gradient."""
    k = _window(kernel_size, stride, padding, dilation, ceil_mode)
    if k is None or x.dim() != 4 or int(x.shape[2]) * int(x.shape[3]) >= MAX_PLANE:
        return NotImplemented
    n, c, h, w = grad_out.shape[0], grad_out.shape[1], int(x.shape[2]), int(x.shape[3])
    planes = (torch.arange(n * c, dtype=torch.int64) * (h * w)).reshape(n, c, 1, 1)  # torch's per-plane index -> flat
    return unpool(grad_out.contiguous(), indices + planes, h, w)


def pools_exactly(x: torch.Tensor, window: tuple[int, int]) -> bool:
    """Whether ``max_pool`` and ``AffineMaxPool`` take a 4-D ``x`` pooled by ``window`` (its planes small enough)."""
    return x.dim() == 4 and int(x.shape[2]) * int(x.shape[3]) < MAX_PLANE and min(window) >= 1


@torch.library.custom_op("edgepeft::window_pick", mutates_args=())
def window_pick(x: torch.Tensor, a: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """x at each k_h x k_w window's first maximum of x·a (a per channel): the window's maximum where a > 0, its minimum
    where a < 0, its first element where a = 0 (where every element of x·a ties)."""
    hi = torch.nn.functional.max_pool2d(x, (kh, kw))
    lo = -torch.nn.functional.max_pool2d(-x, (kh, kw))
    first = x[:, :, :hi.shape[2] * kh:kh, :hi.shape[3] * kw:kw]
    s = a[:, None, None]
    return torch.where(s > 0, hi, torch.where(s < 0, lo, first))


@window_pick.register_fake
def _(x, a, kh, kw):
    return x.new_empty(x.shape[0], x.shape[1], x.shape[2] // kh, x.shape[3] // kw)


def window_pick_onnx(x, a, kh: int, kw: int):
    """``window_pick`` in ONNX: with s = -1 where a < 0, else 1, s·MaxPool(x·s); where a = 0 a MaxPool with a 1x1 window
    (each window's first element). One channel per plane, as in ``max_pool_onnx``."""
    from onnxscript import opset18 as op

    c, h, w = (int(d) for d in x.shape[1:])
    ho, wo = h // kh, w // kw
    planes, back = op.Constant(value_ints=[-1, 1, h, w]), op.Constant(value_ints=[-1, c, ho, wo])
    a3, zero = op.Reshape(a, op.Constant(value_ints=[c, 1, 1])), op.Constant(value_float=0.0)
    sign = op.Where(op.Less(a3, zero), op.Constant(value_float=-1.0), op.Constant(value_float=1.0))
    top, _ = op.MaxPool(op.Reshape(op.Mul(x, sign), planes), kernel_shape=[kh, kw], strides=[kh, kw])
    first, _ = op.MaxPool(op.Reshape(x, planes), kernel_shape=[1, 1], strides=[kh, kw])
    if (h % kh, w % kw) != (0, 0):  # a ragged edge: the 1x1 pooling kept its partial windows' first elements
        first = op.Slice(first, op.Constant(value_ints=[0, 0]), op.Constant(value_ints=[ho, wo]), op.Constant(value_ints=[2, 3]))
    return op.Where(op.Equal(a3, zero), op.Reshape(first, back), op.Mul(op.Reshape(top, back), sign))


class AffineMaxPool(torch.autograd.Function):
    """``max_pool(x·a + shift)``, a and shift per channel (a tuned BatchNorm, then max pooling), with the backward pass
    on the pooled map: the gradients of a and shift are sums over the pooled map of g·x̃ and g, where x̃ is x at each
    window's first maximum of x·a, and x's gradient (where x needs one) is g·a scattered by one MaxUnpool. Traced
    through autograd, the norm's gradients were sums over the full-size map after the scatter (the scattered gradient
    times x, reduced; and times a), four full-size passes per block; here each is a quarter of that.

    The window's maximum is searched on x·a (the shift is the same for the whole window), and the output is that
    maximum plus the shift: the same values as pooling x·a + shift, as rounding is monotone. Where x needs no gradient
    (the first block of a model whose convolution is frozen), no index is needed: x̃ is the window's maximum of x, its
    minimum or its first element by the sign of a (``window_pick``), and the output x̃·a + shift; the index search
    (``max_pool_onnx``: five full-size passes) and the gather are skipped. KWS CNN BN + head step, batch 16, one thread:
    14.3 -> 11.6 ms of CPU in alternating rounds under load (benchmarks/results/speech_session4.json), 13.2 -> 10.9 ms
    quiet (speech_profile4.json, with the per-operator profiles); LoRA + head's graph is unchanged."""

    @staticmethod
    def forward(ctx, x, a, shift, kh: int, kw: int, input_grad: bool):
        ctx.input_grad = input_grad
        if not input_grad:
            picked = window_pick(x, a, kh, kw)
            ctx.save_for_backward(picked)
            return picked * a[:, None, None] + shift[:, None, None]
        top, index = max_pool(x * a[:, None, None], kh, kw)
        ctx.save_for_backward(x, a, index)
        return top + shift[:, None, None]

    @staticmethod
    def backward(ctx, g):
        if not ctx.input_grad:
            (picked,) = ctx.saved_tensors
            return None, (g * picked).sum((0, 2, 3)), g.sum((0, 2, 3)), None, None, None
        x, a, index = ctx.saved_tensors
        n, c, h, w = x.shape
        picked = x.reshape(n, c, h * w).gather(2, index.reshape(n, c, -1)).reshape(g.shape)  # GatherElements
        planes = (torch.arange(n * c, dtype=torch.int64) * (h * w)).reshape(n, c, 1, 1)  # per-plane index -> flat
        dx = unpool((g * a[:, None, None]).contiguous(), index + planes, h, w)
        return dx, (g * picked).sum((0, 2, 3)), g.sum((0, 2, 3)), None, None, None


def decompositions() -> dict[object, Callable]:
    """The decomposition table entries for the tracer (exporters/trace.py adds them to the core decompositions)."""
    return {aten.max_pool2d_with_indices.default: max_pool2d_with_indices,
            aten.max_pool2d_with_indices_backward.default: max_pool2d_with_indices_backward}


def translations() -> dict[object, Callable]:
    """torch.onnx.export's custom_translation_table entries (exporters/trace.py): the custom ops above in ONNX."""
    return {torch.ops.edgepeft.max_pool.default: max_pool_onnx, torch.ops.edgepeft.unpool.default: unpool_onnx,
            torch.ops.edgepeft.window_pick.default: window_pick_onnx}
