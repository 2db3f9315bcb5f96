"""exporters/pool_grad.py: max pooling, its indices and its gradient (a scatter at them) equal torch's, ties and ragged edges
included."""

from __future__ import annotations

import pytest
import torch

from edgepeft.exporters.pool_grad import max_pool2d_with_indices, max_pool2d_with_indices_backward


def _torch(x: torch.Tensor, k) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y, idx = torch.nn.functional.max_pool2d(x, k, return_indices=True)
    g = torch.arange(y.numel(), dtype=x.dtype).reshape(y.shape)  # distinct values: a misplaced gradient shows
    y.backward(g)
    return y.detach(), idx, x.grad


@pytest.mark.parametrize("shape, k", [((2, 3, 8, 10), 2), ((2, 3, 9, 11), 2), ((1, 2, 10, 7), 3)])
def test_max_pool_and_its_gradient_equal_torch_on_ragged_sizes(shape, k):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    want_y, want_idx, want_g = _torch(x, k)
    y, idx = max_pool2d_with_indices(x, [k, k])
    g = max_pool2d_with_indices_backward(torch.arange(y.numel(), dtype=x.dtype).reshape(y.shape), x, [k, k], [], [0, 0],
                                         [1, 1], False, idx)
    assert torch.equal(y, want_y)
    assert torch.equal(idx, want_idx)
    assert torch.equal(g, want_g)


def test_ties_send_the_gradient_to_the_first_maximum_as_torch_does():
    x = torch.relu(torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1)))  # many zeros: windows of equal values
    x[:, :, 0:2, 0:2] = 1.5  # a positive tie too
    want_y, want_idx, want_g = _torch(x, 2)
    y, idx = max_pool2d_with_indices(x, [2, 2])
    g = max_pool2d_with_indices_backward(torch.arange(y.numel(), dtype=x.dtype).reshape(y.shape), x, [2, 2], [2, 2], 0, 1,
                                         False, idx)
    assert torch.equal(idx, want_idx)
    assert torch.equal(g, want_g)


def test_a_pooling_with_padding_or_another_stride_is_left_to_the_exporter():
    x = torch.randn(1, 1, 6, 6)
    assert max_pool2d_with_indices(x, [3, 3], [2, 2]) is NotImplemented
    assert max_pool2d_with_indices(x, [2, 2], [2, 2], [1, 1]) is NotImplemented
    assert max_pool2d_with_indices(x, [2, 2], [2, 2], 0, 1, True) is NotImplemented


def _onnx_pool_and_grad(x: torch.Tensor, k: tuple[int, int], g: torch.Tensor) -> list:
    """The pooled map, and the gradient of (pooled * g).sum(), as the tracer exports them (MaxPool, MaxUnpool), run in
    onnxruntime."""
    import onnxruntime as ort
    from torch.export import Dim

    from edgepeft.exporters.trace import _export

    def step(x, g):
        y = torch.nn.functional.max_pool2d(x, k)
        return y, torch.autograd.grad((y * g).sum(), x)[0]

    b = Dim("batch", min=1)
    model = _export(step, [x.clone().requires_grad_(True), g], ["x", "g"], ["y", "gx"], [{0: b}, {0: b}], 20)
    ops = {n.op_type for n in model.graph.node}
    assert {"MaxPool", "MaxUnpool"} <= ops and "ScatterElements" not in ops and "Transpose" not in ops, ops
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy(), "g": g.numpy()})


@pytest.mark.parametrize("shape, k", [((2, 3, 8, 10), (2, 2)), ((3, 2, 9, 11), (2, 2)), ((2, 2, 10, 7), (2, 1))])
def test_the_exported_pooling_and_gradient_equal_torch_with_ties_and_ragged_edges(shape, k):
    x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(2)))  # zeros: windows of equal values
    x[:, :, 0:2, 0:2] = 1.5  # a positive tie
    x[0, 0, 2:4, 2:4] = torch.tensor([[0.5, 2.0], [2.0, 2.0]])  # a later tie
    want_y, _, _ = _torch(x, k)
    g = torch.arange(1, want_y.numel() + 1, dtype=x.dtype).reshape(want_y.shape)  # distinct values: a misplaced gradient shows
    xg = x.clone().requires_grad_(True)
    want_g = torch.autograd.grad((torch.nn.functional.max_pool2d(xg, k) * g).sum(), xg)[0]
    got_y, got_g = _onnx_pool_and_grad(x, k, g)
    assert (got_y == want_y.numpy()).all()
    assert (got_g == want_g.numpy()).all()


def _ties(shape) -> torch.Tensor:
    x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(3)))  # zeros: windows of equal values
    x[:, :, 0:2, 0:2] = 1.5  # a positive tie
    x[0, 0, 2:4, 2:4] = torch.tensor([[0.5, 2.0], [2.0, 2.0]])  # a later tie
    x[0, 1, 2:4, 2:4] = torch.tensor([[-1.0, 0.5], [-1.0, -1.0]])  # a tie of minima
    return x


def _channel_scales(c: int) -> torch.Tensor:
    """Per-channel scales of every sign: positive, negative, zero, repeating."""
    return torch.tensor([1.5, -0.75, 0.0] * c)[:c]


@pytest.mark.parametrize("shape, k", [((2, 3, 8, 10), (2, 2)), ((3, 4, 9, 11), (2, 2)), ((2, 3, 10, 7), (2, 1))])
def test_window_pick_is_x_at_the_first_maximum_of_x_times_a(shape, k):
    from edgepeft.exporters.pool_grad import window_pick

    x, a = _ties(shape), _channel_scales(shape[1])
    _, idx = torch.nn.functional.max_pool2d(x * a[:, None, None], k, return_indices=True)  # torch's first maxima
    want = x.flatten(2).gather(2, idx.flatten(2)).reshape(idx.shape)
    assert torch.equal(window_pick(x, a, *k), want)


def _affine_pool_exported(x, a, shift, g, k, input_grad: bool):
    """``AffineMaxPool`` traced and exported as the train graph is, run in onnxruntime: the output and the gradients of
    (output * g).sum() for a, shift and (``input_grad``) x; and the graph's operator kinds."""
    import onnxruntime as ort
    from torch.export import Dim

    from edgepeft.exporters.pool_grad import AffineMaxPool
    from edgepeft.exporters.trace import _export

    def step(x, a, shift, g):
        y = AffineMaxPool.apply(x, a, shift, k[0], k[1], input_grad)
        return (y, *torch.autograd.grad((y * g).sum(), [x, a, shift] if input_grad else [a, shift]))

    b = Dim("batch", min=1)
    names = ["y", *(["gx"] if input_grad else []), "ga", "gs"]
    model = _export(step, [x.clone().requires_grad_(input_grad), a.clone().requires_grad_(True),
                           shift.clone().requires_grad_(True), g], ["x", "a", "shift", "g"], names,
                    [{0: b}, None, None, {0: b}], 20)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy(), "a": a.numpy(), "shift": shift.numpy(), "g": g.numpy()}), \
        {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("shape, k", [((2, 3, 8, 10), (2, 2)), ((3, 4, 9, 11), (2, 2)), ((2, 3, 10, 7), (2, 1))])
def test_the_exported_norm_and_pooling_equal_torch_for_scales_of_every_sign(shape, k, input_grad):
    x, a = _ties(shape), _channel_scales(shape[1])
    shift = torch.linspace(-0.5, 0.5, shape[1])
    xg, ag, sg = (t.clone().requires_grad_(True) for t in (x, a, shift))
    want_y = torch.nn.functional.max_pool2d(xg * ag[:, None, None] + sg[:, None, None], k)  # as torch + PEFT computes it
    g = torch.arange(1, want_y.numel() + 1, dtype=x.dtype).reshape(want_y.shape).cos()  # distinct: a misplaced gradient shows
    want = torch.autograd.grad((want_y * g).sum(), [xg, ag, sg] if input_grad else [ag, sg])
    got, ops = _affine_pool_exported(x, a, shift, g, k, input_grad)
    assert abs(got[0] - want_y.detach().numpy()).max() < 1e-6
    for ours, theirs in zip(got[1:], want):
        assert abs(ours - theirs.numpy()).max() <= 1e-5 * max(1.0, theirs.abs().max().item())
    assert "ScatterElements" not in ops and "Transpose" not in ops, ops
    if not input_grad:  # no index search, no scatter, no gather: window_pick's poolings only
        assert not {"MaxUnpool", "GatherElements", "Resize"} & ops, ops
