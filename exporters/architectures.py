"""Model families the exporter knows: tasks, where the layers are, each method's default targets.

Adding a family is one entry in ``FAMILIES``; generic code never lists architectures by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from edgepeft.errors import ExportError
from edgepeft.methods import matches  # noqa: F401  (PEFT's target rule; re-exported for the exporter)
from edgepeft.names import CAUSAL_LM, SEQ_CLS


@dataclass(frozen=True)
class Family:
    """What the exporter needs to know about one family of architectures."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values
    tasks: tuple[str, ...]  # tasks this family can be exported for; the first is the default
    layer_regex: str  # extracts the layer index from a module path
    # Per method option, the family's default: "<method>.<option>" -> module patterns or leaf names.
    # A method reads its own keys (edgepeft.methods.ModelView.default); a new method adds keys here.
    defaults: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    kv_cache: bool = True  # causal LM: model.onnx takes and returns a KV cache (GPT-2's traced positions specialize)


FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert", "roberta", "xlm-roberta", "electra"), (SEQ_CLS,), r"\.layer\.(\d+)\.", {
        "lora.targets": ("query", "value"),
        "bitfit.exclude": ("key",),  # softmax shift invariance: the key bias gradient is exactly zero
        "head.modules": ("classifier", "classifier.dense", "classifier.out_proj"),
        "ia3.targets": ("key", "value", "output.dense"),  # PEFT's defaults (and the feed-forward one below)
        "ia3.feedforward": ("output.dense",),
        # methods3: bottleneck adapters (attention output, feed-forward output; "output.dense" alone would match both)
        "bottleneck.houlsby": ("attention.output.dense", r".*\.layer\.\d+\.output\.dense"),
        "bottleneck.pfeiffer": (r".*\.layer\.\d+\.output\.dense",),
    }),
    Family("distilbert", ("distilbert",), (SEQ_CLS,), r"\.layer\.(\d+)\.", {
        "lora.targets": ("q_lin", "v_lin"), "bitfit.exclude": ("k_lin",), "head.modules": ("pre_classifier", "classifier"),
        "ia3.targets": ("k_lin", "v_lin", "ffn.lin2"), "ia3.feedforward": ("ffn.lin2",),
        "bottleneck.houlsby": ("attention.out_lin", "ffn.lin2"), "bottleneck.pfeiffer": ("ffn.lin2",),  # methods3
    }),
    Family("llama", ("llama", "mistral", "qwen2"), (CAUSAL_LM,), r"\.layers\.(\d+)\.", {
        "lora.targets": ("q_proj", "v_proj"), "bitfit.exclude": ("k_proj",),
        "ia3.targets": ("k_proj", "v_proj", "down_proj"), "ia3.feedforward": ("down_proj",),
        "bottleneck.houlsby": ("o_proj", "down_proj"), "bottleneck.pfeiffer": ("down_proj",),  # methods3
    }),
    Family("gpt2", ("gpt2",), (CAUSAL_LM,), r"\.h\.(\d+)\.", {
        "lora.targets": ("c_attn",),
        "ia3.targets": ("c_attn", "mlp.c_proj"), "ia3.feedforward": ("mlp.c_proj",),
        "bottleneck.houlsby": ("attn.c_proj", "mlp.c_proj"), "bottleneck.pfeiffer": ("mlp.c_proj",),  # methods3
    }, kv_cache=False),
)


def family_for(model_type: str) -> Family:
    """The family of a config's ``model_type``, or an error listing what is supported."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ExportError(f"unsupported architecture {model_type!r}; supported model types: {supported}")


def infer_task(family: Family, architectures: list[str] | None) -> str:
    """The task implied by the config's ``architectures`` (falls back to the family default)."""
    for arch in architectures or []:
        if arch.endswith("ForSequenceClassification"):
            return SEQ_CLS
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return CAUSAL_LM
    return family.tasks[0]


def layer_index(family: Family, module: str) -> int | None:
    """Index of the transformer layer a module belongs to (None outside the layer stack)."""
    m = re.search(family.layer_regex, "." + module + ".")
    return int(m.group(1)) if m else None
