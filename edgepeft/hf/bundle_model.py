"""A bundle's ``model.onnx`` with deltas as a ``transformers`` model: ``transformers.pipeline`` runs it.

Follows optimum's ONNX Runtime model classes (``ORTModelForSequenceClassification``: a config, a
``forward`` taking the tokenizer's tensors and returning ``.logits``, ``device``/``to`` for the pipeline).
optimum's own classes moved to ``optimum-onnx``, whose release pins transformers < 4.58, and they expect
their own graph layout; this class runs the bundle through edgepeft's Predictor instead, so the delta
feeding (slots, neutral values, mixes) is the device runtime's, unchanged.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerFast, pipeline
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

from edgepeft.names import SEQ_CLS, TOKEN_CLS
from edgepeft.runtime.bundle import Bundle, open_bundle
from edgepeft.runtime.feeds import DeltaLike
from edgepeft.runtime.infer import Predictor

PIPELINE_TASKS = {SEQ_CLS: "text-classification", TOKEN_CLS: "token-classification"}


class BundleModel:
    """A classification bundle + deltas, called like a ``transformers`` model: ``model(input_ids=..., attention_mask=...)``."""

    main_input_name = "input_ids"
    device = torch.device("cpu")  # onnxruntime on the CPU; the pipeline reads it and moves tensors here

    def __init__(self, bundle: Bundle, deltas: Sequence[DeltaLike] = (), weights: Sequence[float] | None = None) -> None:
        m = bundle.manifest
        if m.task not in PIPELINE_TASKS:
            raise ValueError(f"{bundle.path}: a {m.task} bundle has no pipeline here; supported: {', '.join(PIPELINE_TASKS)}")
        self.predictor = Predictor(bundle)
        self.deltas, self.weights = list(deltas), weights
        self.config = PretrainedConfig(id2label=dict(enumerate(m.labels)), label2id={l: i for i, l in enumerate(m.labels)},
                                       model_type=m.model_type, architectures=[m.architecture])
        self.task = PIPELINE_TASKS[m.task]

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, deltas: Sequence[DeltaLike] = (),
                    weights: Sequence[float] | None = None) -> "BundleModel":
        """Open the bundle at ``path`` (``deltas``: loaded Delta objects, mixed with ``weights``)."""
        return cls(open_bundle(path), deltas, weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: torch.Tensor):
        """Logits of the bundle's inference graph with this model's deltas (token_type_ids and the like are not inputs)."""
        ids = input_ids.cpu().numpy()
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy()
        logits = torch.from_numpy(self.predictor.logits(ids, mask, self.deltas, self.weights))
        return (TokenClassifierOutput if self.task == "token-classification" else SequenceClassifierOutput)(logits=logits)

    __call__ = forward

    def to(self, device: torch.device | str) -> "BundleModel":
        """The pipeline moves its model; onnxruntime runs here on the CPU whatever is asked."""
        return self

    def can_generate(self) -> bool:
        return False


def bundle_tokenizer(bundle: Bundle) -> PreTrainedTokenizerFast:
    """The bundle's tokenizer.json as a ``transformers`` fast tokenizer (padding with the bundle's pad id)."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(bundle.path / bundle.manifest.tokenizer),
                                  model_max_length=bundle.manifest.max_length)
    tok.pad_token = tok.convert_ids_to_tokens(bundle.manifest.pad_token_id)
    return tok


def bundle_pipeline(path: str | os.PathLike, deltas: Sequence[DeltaLike] = (), weights: Sequence[float] | None = None, **kwargs):
    """``transformers.pipeline`` of the bundle at ``path`` with ``deltas``: text- or token-classification."""
    model = BundleModel.from_bundle(path, deltas, weights)
    # The pipeline logs an error for any model class outside transformers' auto mappings (optimum registers
    # its classes there; a global registration for one wrapper is worse than a quiet check): silenced here.
    log = logging.getLogger("transformers.pipelines.base")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return pipeline(model.task, model=model, tokenizer=bundle_tokenizer(model.predictor.bundle), **kwargs)
    finally:
        log.setLevel(level)
