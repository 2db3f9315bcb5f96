"""Model families the exporter knows: default LoRA targets, heads, tasks, where the layers are.

Adding a family is one entry in ``FAMILIES``; generic code never lists architectures by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgepeft.errors import ExportError
from edgepeft.names import CAUSAL_LM, SEQ_CLS


@dataclass(frozen=True)
class Family:
    """What the exporter needs to know about one family of architectures."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values
    tasks: tuple[str, ...]  # tasks this family can be exported for; the first is the default
    lora_targets: tuple[str, ...]  # default --targets
    bitfit_exclude: tuple[str, ...]  # leaf names whose bias gradient is useless (key: softmax shift)
    head_modules: tuple[str, ...]  # classifier modules that get full weight+bias deltas (seq-cls)
    layer_regex: str  # extracts the layer index from a module path
    kv_cache: bool = True  # causal LM: model.onnx takes and returns a KV cache (GPT-2's traced positions specialize)


FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert", "roberta", "xlm-roberta", "electra"), (SEQ_CLS,),
           ("query", "value"), ("key",), ("classifier", "classifier.dense", "classifier.out_proj"),
           r"\.layer\.(\d+)\."),
    Family("distilbert", ("distilbert",), (SEQ_CLS,),
           ("q_lin", "v_lin"), ("k_lin",), ("pre_classifier", "classifier"), r"\.layer\.(\d+)\."),
    Family("llama", ("llama", "mistral", "qwen2"), (CAUSAL_LM,),
           ("q_proj", "v_proj"), ("k_proj",), (), r"\.layers\.(\d+)\."),
    Family("gpt2", ("gpt2",), (CAUSAL_LM,),
           ("c_attn",), (), (), r"\.h\.(\d+)\.", kv_cache=False),
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


def matches(module: str, pattern: str) -> bool:
    """PEFT's rule: a pattern matches a module whose path equals it or ends with '.' + it; regex if it has one of ^$*[."""
    if any(c in pattern for c in "^$*[(|"):
        return re.fullmatch(pattern, module) is not None
    return module == pattern or module.endswith("." + pattern)
