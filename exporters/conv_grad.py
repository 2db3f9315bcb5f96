"""``aten.convolution_backward`` in forward convolutions, for tracing a CNN's training step to ONNX.

The ONNX exporter has no translation for the backward op, so the tracer decomposes it:
the input gradient is the transposed convolution of the output gradient (ONNX ConvTranspose, any
groups); the weight gradient is one matrix product per kernel position, of the output gradient by the
input slice that position sees. Weight gradients are
needed only for trainable convolutions (LoRA's A and B, never grouped), so grouped weight gradients
are refused rather than decomposed.
"""

from __future__ import annotations

from typing import Callable

import torch

aten = torch.ops.aten


def _input_grad(grad_out, inp, weight, stride, padding, dilation, groups):
    # output_padding recovers the input size lost to a stride that does not divide it
    extra = [inp.shape[2 + i] - ((grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1) + 1)
             for i in range(2)]
    return aten.convolution(grad_out, weight, None, stride, padding, dilation, True, extra, groups)


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
    # one matrix product per kernel position over the input slice it sees. Written as a convolution whose kernel is
    # the whole output (batch and channels swapped) it is the same arithmetic, but onnxruntime ran that giant-kernel
    # convolution 3-5x slower than these products (the KWS CNN's LoRA A gradients: most of its convolution time).
    (kh, kw), (o, c) = weight.shape[2:], (grad_out.shape[1], inp.shape[1])
    ho, wo = grad_out.shape[2:]
    x = aten.constant_pad_nd(inp, [padding[1], padding[1], padding[0], padding[0]], 0.0).permute(0, 2, 3, 1)  # NHWC
    cols = torch.cat([x[:, u * dilation[0]:u * dilation[0] + (ho - 1) * stride[0] + 1:stride[0],
                        v * dilation[1]:v * dilation[1] + (wo - 1) * stride[1] + 1:stride[1]]
                      for u in range(kh) for v in range(kw)], -1)  # (N, Ho, Wo, kh*kw*C): im2col by slices
    gw = torch.matmul(grad_out.permute(1, 0, 2, 3).reshape(o, -1), cols.reshape(-1, kh * kw * c))  # (O, kh*kw*C)
    return gw.reshape(o, kh, kw, c).permute(0, 3, 1, 2)


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
    """The decomposition table entry for the tracer (exporters/trace.py adds it to the core decompositions)."""
    return {aten.convolution_backward.default: convolution_backward}
