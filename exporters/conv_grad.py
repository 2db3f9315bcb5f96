"""``aten.convolution_backward`` in forward convolutions, for tracing a CNN's training step to ONNX.

The ONNX exporter has no translation for the backward op, so the tracer decomposes it:
the input gradient is the transposed convolution of the output gradient (ONNX ConvTranspose, any
groups); the weight gradient is a convolution of the input by the output gradient with batch and
channels swapped (stride and dilation trade places), cut to the kernel size. Weight gradients are
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


def _weight_grad(grad_out, inp, weight, stride, padding, dilation, groups):
    if groups != 1:
        raise NotImplementedError("weight gradient of a grouped convolution (its weight is frozen in every edgepeft method)")
    # gw[o, i, u, v] = sum_{n, y, x} grad_out[n, o, y, x] * inp_padded[n, i, y*stride + u*dilation, x*stride + v*dilation]
    gw = aten.convolution(inp.transpose(0, 1), grad_out.transpose(0, 1), None, dilation, padding, stride, False, [0, 0], 1)
    return gw.transpose(0, 1)[:, :, :weight.shape[2], :weight.shape[3]]


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
