"""``aten.convolution_backward`` in forward convolutions, for tracing a CNN's training step to ONNX, and 1x1
convolutions over small maps as matrix products.

The ONNX exporter has no translation for the backward op, so the tracer decomposes it. The input gradient is the
transposed convolution of the output gradient (ONNX ConvTranspose), except for depthwise convolutions, whose input
gradient is a forward depthwise convolution (below). The weight gradient is one matrix product per kernel position,
of the output gradient by the input slice that position sees. Weight gradients are needed only for trainable
convolutions (LoRA's A and B, never grouped), so grouped weight gradients are refused rather than decomposed.

onnxruntime runs a convolution (and a transposed one) one image at a time. On the 2x2 and 4x4 maps of a mobile CNN's
last blocks a 1x1 convolution is then a batch of gemms of 4-16 columns each: 3-5x slower than one product over every
pixel of the batch (EfficientNet-Lite0 at 64 px, batch 32). Such convolutions, forward and input gradient, are traced
as Transpose, MatMul, Transpose instead; larger maps keep the convolution, which is faster there."""

from __future__ import annotations

from typing import Callable

import torch

aten = torch.ops.aten


MATMUL_MAX_PIXELS = 16  # a 1x1 convolution over a map of at most this many pixels is a matrix product (docstring)


def _pointwise(weight, stride, padding, dilation, groups, pixels: int) -> bool:
    return (tuple(weight.shape[2:]) == (1, 1) and list(stride) == [1, 1] and list(padding) == [0, 0]
            and list(dilation) == [1, 1] and groups == 1 and pixels <= MATMUL_MAX_PIXELS)


def _channels_matmul(x, w2d):
    """(N, C, H, W) x (C, O) -> (N, O, H, W): one product over all N*H*W pixels."""
    n, c, h, w = x.shape
    # 2-D operands: a 4-D matmul traced with a symbolic batch became Expand of the weight per image and a batched product
    y = torch.mm(x.permute(0, 2, 3, 1).reshape(-1, c), w2d)
    # contiguous: a permuted result reaching a later view (EfficientNet's flatten) traced to as_strided_scatter,
    # which the ONNX exporter cannot translate; in ONNX, which has no strides, it costs nothing
    return y.reshape(n, h, w, w2d.shape[1]).permute(0, 3, 1, 2).contiguous()


def convolution(inp, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """A 1x1 convolution over a small map as a matrix product; every other convolution as it is."""
    if transposed or inp.dim() != 4 or not _pointwise(weight, stride, padding, dilation, groups, inp.shape[2] * inp.shape[3]):
        return NotImplemented
    out = _channels_matmul(inp, weight.reshape(weight.shape[0], weight.shape[1]).permute(1, 0))
    return out if bias is None else out + bias[None, :, None, None]


def _input_grad(grad_out, inp, weight, stride, padding, dilation, groups):
    if _pointwise(weight, stride, padding, dilation, groups, inp.shape[2] * inp.shape[3]):
        return _channels_matmul(grad_out, weight.reshape(weight.shape[0], weight.shape[1]))
    # output_padding recovers the input size lost to a stride that does not divide it
    extra = [inp.shape[2 + i] - ((grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1) + 1)
             for i in range(2)]
    if _depthwise(weight, groups) and list(dilation) == [1, 1] and all(p < k for p, k in zip(padding, weight.shape[2:])):
        return _depthwise_input_grad(grad_out, weight, stride, padding, extra)
    if groups == 1 and list(stride) == [1, 1] and list(dilation) == [1, 1] and all(p < k for p, k in zip(padding, weight.shape[2:])):
        # stride 1: the transposed convolution is a forward one, channels swapped, kernel flipped, padded by k-1-p.
        # onnxruntime's fast (NCHWc) convolutions take forward Convs with a constant weight (the flip and transpose of
        # a frozen weight fold away at load); its ConvTranspose has no such kernel. The KWS CNN's BN + head step
        # (batch 16, one thread): 17.4 -> 16.8 ms of CPU (benchmarks/results/speech_session.json).
        pad = [k - 1 - p for p, k in zip(padding, weight.shape[2:])]
        return aten.convolution(grad_out, weight.transpose(0, 1).flip([2, 3]), None, [1, 1], pad, [1, 1], False, [0, 0], 1)
    return aten.convolution(grad_out, weight, None, stride, padding, dilation, True, extra, groups)


def _depthwise(weight, groups) -> bool:
    return groups > 1 and groups == weight.shape[0] and weight.shape[1] == 1


def _depthwise_input_grad(grad_out, weight, stride, padding, extra):
    # onnxruntime runs a grouped ConvTranspose one group at a time: for EfficientNet-Lite0's deep depthwise layers
    # (480-1152 channels of 2x2-4x4) that was 20-40x slower than its depthwise Conv kernel on the same shapes, and
    # the transposed convolutions were a third of a training step. The same gradient as a forward convolution: stuff
    # stride-1 zeros between the gradient's rows and columns, pad by k-1-p (plus the rows a stride dropped), and
    # convolve with the kernel flipped in both axes. The flip of a constant weight folds away when the session loads.
    n, c, ho, wo = grad_out.shape
    (sh, sw), (kh, kw) = stride, weight.shape[2:]
    g = grad_out
    if (sh, sw) != (1, 1):  # (N, C, Ho, 1, Wo, 1) padded to (N, C, Ho, sh, Wo, sw): each value then sh-1 / sw-1 zeros
        g = aten.constant_pad_nd(g.reshape(n, c, ho, 1, wo, 1), [0, sw - 1, 0, 0, 0, sh - 1], 0.0)
        g = g.reshape(n, c, ho * sh, wo * sw)[:, :, :(ho - 1) * sh + 1, :(wo - 1) * sw + 1]
    (ph, pw), (eh, ew) = padding, extra
    g = aten.constant_pad_nd(g, [kw - 1 - pw, kw - 1 - pw + ew, kh - 1 - ph, kh - 1 - ph + eh], 0.0)
    return aten.convolution(g, weight.flip([2, 3]), None, [1, 1], [0, 0], [1, 1], False, [0, 0], c)


# Kernels of at most this many positions get the im2col weight gradient below; larger ones (torchcrepe's 64- and
# 512-tap convolutions) keep the giant-kernel convolution form, since their slices copy the input once per tap:
# with im2col crepe-tiny's LoRA run peaked at 393 MB instead of 139 MB for a step 10 % faster (bench_pitch.py, quiet).
IM2COL_MAX_TAPS = 9


def _weight_grad(grad_out, inp, weight, stride, padding, dilation, groups):
    if groups != 1:
        raise NotImplementedError("weight gradient of a grouped convolution (its weight is frozen in every edgepeft method)")
    if weight.shape[2] * weight.shape[3] > IM2COL_MAX_TAPS:
        gw = aten.convolution(inp.transpose(0, 1), grad_out.transpose(0, 1), None, dilation, padding, stride, False, [0, 0], 1)
        return gw.transpose(0, 1)[:, :, :weight.shape[2], :weight.shape[3]]
    # gw[o, i, u, v] = sum_{n, y, x} grad_out[n, o, y, x] * inp_padded[n, i, y*stride + u*dilation, x*stride + v*dilation]:
    # one matrix product over the input slices each kernel position sees. Written as a convolution whose kernel is
    # the whole output (batch and channels swapped) it is the same arithmetic, but onnxruntime ran that giant-kernel
    # convolution 3-5x slower than a product (the KWS CNN's LoRA A gradients: most of its convolution time).
    # The slices are cut from the input with channels first, (C, N, H, W), and stacked along that first axis, so the
    # im2col matrix (kh*kw*C, N*Ho*Wo) is written in whole contiguous blocks and is the product's left operand,
    # the small gradient (N*Ho*Wo, O) its right one. Stacked on the last axis (NHWC), with the gradient on the left,
    # the KWS CNN's second block spent 2.3 ms in that Concat and 2.7 ms in the product (batch 16, one thread), and its
    # LoRA + head step took 31.5 ms of CPU against 29.8 ms in this form (benchmarks/results/speech_session.json).
    (kh, kw), o = weight.shape[2:], grad_out.shape[1]
    if (kh, kw) == (1, 1) and list(stride) == [1, 1] and list(padding) == [0, 0]:
        # a 1x1 convolution (LoRA's B): per image (O, H*W) x (H*W, C), both read in place, then summed over the batch.
        # Through im2col both operands were transposed first, the gradient (O channels, full size) the larger: on the
        # KWS CNN's LoRA + head step (batch 16, one thread) about 1 % of the step, ~0.2 ms of ~20.
        n, c = inp.shape[:2]
        gw = torch.matmul(grad_out.reshape(n, o, -1), inp.reshape(n, c, -1).transpose(1, 2)).sum(0)  # (O, C)
        return gw.reshape(o, c, 1, 1)
    cols = im2col(inp, (kh, kw), stride, padding, dilation)
    gw = torch.matmul(cols, grad_out.permute(0, 2, 3, 1).reshape(-1, o))  # (kh*kw*C, O)
    return gw.reshape(kh, kw, inp.shape[1], o).permute(3, 2, 0, 1)


def im2col(inp, kernel, stride, padding, dilation):
    """(N, C, H, W) -> (kh*kw*C, N*Ho*Wo), rows in (kernel row, kernel column, channel) order: the input slice each
    kernel position sees, cut with channels first, (C, N, H, W), and stacked along that axis in whole blocks."""
    (kh, kw), c = kernel, inp.shape[1]
    ho = (inp.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (inp.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = aten.constant_pad_nd(inp.permute(1, 0, 2, 3), [padding[1], padding[1], padding[0], padding[0]], 0.0)  # (C, N, H, W)
    cols = torch.cat([x[:, :, u * dilation[0]:u * dilation[0] + (ho - 1) * stride[0] + 1:stride[0],
                        v * dilation[1]:v * dilation[1] + (wo - 1) * stride[1] + 1:stride[1]]
                      for u in range(kh) for v in range(kw)], 0)  # (kh*kw*C, N, Ho, Wo)
    return cols.reshape(kh * kw * c, -1)


def convolution_backward(grad_out, inp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
                         output_mask):
    """(grad input, grad weight, grad bias) of a 2-D convolution, each only where ``output_mask`` asks."""
    if transposed or inp.dim() != 4:
        raise NotImplementedError("only the backward of a plain 2-D convolution is decomposed")
    gi = _input_grad(grad_out, inp, weight, stride, padding, dilation, groups) if output_mask[0] else None
    gw = _weight_grad(grad_out, inp, weight, stride, padding, dilation, groups) if output_mask[1] else None
    gb = grad_out.sum((0, 2, 3)) if output_mask[2] else None
    return gi, gw, gb


def decompositions() -> dict[object, Callable]:
    """The decomposition table entries for the tracer (exporters/trace.py adds them to the core decompositions)."""
    return {aten.convolution_backward.default: convolution_backward, aten.convolution.default: convolution}
