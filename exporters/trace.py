"""Trace the inference function and the training step, and export each to ONNX.

The route (shared/notes/train-step-export.md): the step, autograd included, is traced with
``make_fx(tracing_mode="symbolic")`` into a GraphModule, which ``torch.onnx.export(dynamo=True)``
translates. Frozen weights are inputs of the traced function (through ``functional_call``) so the
exporter cannot fold them into pre-transposed copies; ``weights.py`` turns them into shared
initializers afterwards. The loss is written by hand: the exporter's ``nll_loss`` translation
gives gradients N times too large.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Callable

import onnx
import torch
import torch._decomp
from torch.export import Dim
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

from edgepeft.manifest import Slot
from edgepeft.methods import owner
from edgepeft.names import (ATTENTION_MASK, CAUSAL_LM, CLASSIFICATION_TASKS, IGNORED_LABEL, INPUT_IDS, LABELS, LOGITS, LOSS,
                            SEQ_CLS, TOKEN_CLS, grad_name)
from edgepeft.exporters import conv_grad, pool_grad
from edgepeft.exporters.inject import DeltaFeed
from edgepeft.exporters.virtual import model_inputs


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, by hand. logits (B, C), labels (B,)."""
    logp = logits.log_softmax(-1)
    return -logp.gather(1, labels[:, None]).mean()


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens (labels != IGNORED_LABEL), by hand. logits (B, T, C), labels (B, T)."""
    keep = labels != IGNORED_LABEL
    logp = logits.log_softmax(-1)
    nll = -logp.gather(2, labels.clamp(min=0)[..., None])[..., 0]  # (B, T); ignored positions read class 0, then drop
    return (nll * keep).sum() / keep.sum().clamp(min=1)


def make_functions(model: torch.nn.Module, feed: DeltaFeed, slots: list[Slot], task: str,
                   param_names: list[str]) -> tuple[Callable, Callable]:
    """A classifier's inference function and training step, both flat: (batch..., deltas..., params...)."""
    names = [s.name for s in slots]
    n = len(names)
    classifier = _Classifier(model, feed)
    pnames = ["model." + p for p in param_names]

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor, rest: tuple) -> torch.Tensor:
        feed.tensors = dict(zip(names, rest[:n]))
        return functional_call(classifier, dict(zip(pnames, rest[n:])), (input_ids, attention_mask))

    def infer(input_ids, attention_mask, *rest):
        return run(input_ids, attention_mask, rest)

    def train(input_ids, attention_mask, labels, *rest):  # causal LMs: exporters/causal_lm.py
        loss_fn = token_classification_loss if task == TOKEN_CLS else classification_loss
        loss = loss_fn(run(input_ids, attention_mask, rest), labels)
        extra = feed.regularization()  # a method's own loss term (AdaLoRA's orthogonality), on the same deltas
        loss = loss if extra is None else loss + extra
        return (loss, *torch.autograd.grad(loss, rest[:n]))

    return infer, train


class _Classifier(torch.nn.Module):
    """The classifier called with the call's model inputs (virtual tokens grow the sequence: exporters/virtual.py)."""

    def __init__(self, model: torch.nn.Module, feed: DeltaFeed) -> None:
        super().__init__()
        self.model = model
        self.feed = feed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs, _ = model_inputs(self.model, self.feed, input_ids, attention_mask)
        return self.model(**kwargs).logits  # (B, C): PEFT's pooler reads the first position, a virtual token


def infer_dims(slots: list[Slot]) -> list[dict | None]:
    """model.onnx's dynamic slot axes: LoRA's rank (a mix concatenates along it), each virtual-token method's V
    (0 after a causal LM's first call, whose cache then holds them)."""
    rank = Dim("rank", min=0)
    own: dict[str, Dim] = {}  # a method whose modules hold different ranks in one delta (AdaLoRA): a rank axis per module
    out: list[dict | None] = []
    for s in slots:
        m = owner(s.kind)
        ax = m.infer_axis(s.kind)
        if m.varied_ranks and ax is not None:
            dim = own.setdefault(s.module, Dim(f"rank_{len(own)}", min=0))
        else:
            dim = Dim(f"virtual_{m.name}", min=0) if m.virtual else rank
        out.append(None if ax is None else {ax: dim})
    return out


def _example_batch(task: str, vocab: int, labels: int) -> list[torch.Tensor]:
    # Batch 2 and length 8: sizes of 0 or 1 would be specialized by the tracer.
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, vocab), (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    batch = [ids, mask]
    if task == TOKEN_CLS:  # some ignored positions, as real batches have (specials, later sub-words, padding)
        tags = torch.randint(0, max(1, labels), (2, 8), generator=g)
        tags[:, 0] = IGNORED_LABEL
        tags[1, 6:] = IGNORED_LABEL
        batch.append(tags)
    elif task in CLASSIFICATION_TASKS:
        batch.append(torch.tensor([0, max(0, labels - 1)]))
    return batch


def _example_deltas(slots: list[Slot]) -> list[torch.Tensor]:
    # Distinct random values: identical example tensors get merged by the tracer.
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(s.shape, generator=g) * 0.02).requires_grad_(True) for s in slots]


# Backward ops such as silu_backward have no ONNX translation; decomposing them (and the loss) into
# core aten ops while tracing gives graphs the exporter can translate.
# A CNN's convolution_backward has no translation either: exporters/conv_grad.py writes it as forward convolutions.
# Max pooling's translation (indices, a scatter for the gradient) is slow in onnxruntime: exporters/pool_grad.py.
_DECOMPOSITIONS = {**torch._decomp.core_aten_decompositions(), **conv_grad.decompositions(), **pool_grad.decompositions()}


def _tidy(model) -> None:
    """torch.onnx.export's optimize step without onnxscript's pattern rewriter: inline, fold constants, drop dead
    and duplicate nodes, constants as initializers. The rewriter's rules (no-op, cast and reshape simplifications)
    are what onnxruntime's graph optimizer does again at load, and on a real LM's train step the rewriter was most
    of the export (SmolLM2-135M: > 4 CPU minutes in it for the train graph alone, measured with py-spy)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants_ir

    common.InlinePass()(model)
    fold_constants_ir(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass(),
    )(model)


def _export(fn: Callable, args: list[torch.Tensor], input_names: list[str], output_names: list[str],
            dynamic: list[dict | None], opset: int) -> onnx.ModelProto:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        gm = make_fx(fn, decomposition_table=_DECOMPOSITIONS, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*args)
        prog = torch.onnx.export(
            gm, tuple(a.detach() for a in args), dynamo=True, dynamic_shapes=tuple(dynamic),
            input_names=input_names, output_names=output_names, opset_version=opset,
            verify=False, report=False, optimize=False, custom_translation_table=pool_grad.translations(),
        )
        _tidy(prog.model)
    return prog.model_proto


def export_graphs(model: torch.nn.Module, feed: DeltaFeed, slots: list[Slot], task: str,
                  params: dict[str, torch.Tensor], onnx_names: list[str], *, vocab: int, num_labels: int, opset: int,
                  progress: Callable[[str], None]) -> dict[str, onnx.ModelProto]:
    """Export ``{"infer": ..., "train": ...}``; frozen weights are still graph inputs here."""
    if task == CAUSAL_LM:  # chunked loss over labelled positions, KV cache (exporters/causal_lm.py)
        from edgepeft.exporters.causal_lm import export_lm_graphs

        return export_lm_graphs(model, feed, slots, params, onnx_names, vocab=vocab, opset=opset, progress=progress)
    infer, train = make_functions(model, feed, slots, task, list(params))
    pnames = onnx_names  # graph input names of the frozen weights (original module paths)
    batch = _example_batch(task, vocab, num_labels)
    deltas = _example_deltas(slots)
    b, t = Dim("batch", min=1), Dim("seq", min=1)
    batch_dyn: list[dict | None] = [{0: b, 1: t}, {0: b, 1: t}]
    batch_names = [INPUT_IDS, ATTENTION_MASK]
    if task in CLASSIFICATION_TASKS:
        batch_dyn.append({0: b, 1: t} if task == TOKEN_CLS else {0: b})
        batch_names.append(LABELS)
    slot_names = [s.name for s in slots]
    frozen = list(params.values())

    progress("tracing and exporting the training step")
    train_scales = dict(feed.scale)
    train_model = _export(
        train, [*batch, *deltas, *frozen], [*batch_names, *slot_names, *pnames],
        [LOSS, *[grad_name(n) for n in slot_names]], [*batch_dyn, *[None] * len(slots), *[None] * len(pnames)], opset)

    progress("tracing and exporting the inference graph")
    # The inference graph takes a LoRA of any rank (0 = no delta) and no scale: the runtime folds it in (s*B).
    feed.scale = {k: 1.0 for k in train_scales}
    rank_dyn = infer_dims(slots)
    try:
        infer_model = _export(
            infer, [*batch[:2], *[d.detach() for d in deltas], *frozen], [*batch_names[:2], *slot_names, *pnames],
            [LOGITS], [*batch_dyn[:2], *rank_dyn, *[None] * len(pnames)], opset)
    finally:
        feed.scale = train_scales
    return {"infer": infer_model, "train": train_model}
