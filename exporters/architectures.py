"""Model families the exporter knows: tasks, where the layers are, each method's default targets.

Adding a family is one entry in ``FAMILIES`` (and its rows in tests/test_methods_table.py: a family no test
exports is not listed); generic code never lists architectures by hand. Which task a checkpoint's head is
for, and which ``AutoModelFor...`` class loads it, is optimum's ``TasksManager``'s answer, not ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from edgepeft.errors import ExportError
from edgepeft.methods import matches  # noqa: F401  (PEFT's target rule; re-exported for the exporter)
from edgepeft.names import CAUSAL_LM, SEQ_CLS, TOKEN_CLS

# Our task names and optimum's (TasksManager) for the same thing.
OPTIMUM_TASKS = {SEQ_CLS: "text-classification", TOKEN_CLS: "token-classification", CAUSAL_LM: "text-generation"}
# A checkpoint with no head (optimum: feature-extraction) is exported for its family's default task, head freshly made.
HEADLESS = "feature-extraction"


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
    Family("bert", ("bert", "roberta", "xlm-roberta", "electra"), (SEQ_CLS, TOKEN_CLS), r"\.layer\.(\d+)\.", {
        "lora.targets": ("query", "value"),
        "bitfit.exclude": ("key",),  # softmax shift invariance: the key bias gradient is exactly zero
        "head.modules": ("classifier", "classifier.dense", "classifier.out_proj"),
        "ia3.targets": ("key", "value", "output.dense"),  # PEFT's defaults (and the feed-forward one below)
        "ia3.feedforward": ("output.dense",),
        # methods3: bottleneck adapters (attention output, feed-forward output; "output.dense" alone would match both)
        "bottleneck.houlsby": ("attention.output.dense", r".*\.layer\.\d+\.output\.dense"),
        "bottleneck.pfeiffer": (r".*\.layer\.\d+\.output\.dense",),
    }),
    Family("distilbert", ("distilbert",), (SEQ_CLS, TOKEN_CLS), r"\.layer\.(\d+)\.", {
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
    """The task of the config's ``architectures`` (optimum's TasksManager reads the class); a head the
    family cannot export is refused, naming the tasks it can; no head at all: the family default."""
    import transformers
    from optimum.exporters.tasks import TasksManager

    ours = {v: k for k, v in OPTIMUM_TASKS.items()}
    for arch in architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is None:
            continue  # remote code or a class this transformers lacks: the --task option decides
        try:
            task = TasksManager.infer_task_from_model(cls)
        except (ValueError, KeyError):
            continue
        if task == HEADLESS:
            break
        if ours.get(task) not in family.tasks:
            raise ExportError(f"{arch} is a {task} model, which edgepeft cannot export; a {family.name} model "
                              f"supports: {', '.join(family.tasks)} (pass --task to export the base with a new head)")
        return ours[task]
    return family.tasks[0]


def model_class(task: str) -> type:
    """The ``transformers`` auto class that loads a model for ``task`` (TasksManager's choice)."""
    from optimum.exporters.tasks import TasksManager

    return TasksManager.get_model_class_for_task(OPTIMUM_TASKS[task])


def layer_index(family: Family, module: str) -> int | None:
    """Index of the transformer layer a module belongs to (None outside the layer stack)."""
    m = re.search(family.layer_regex, "." + module + ".")
    return int(m.group(1)) if m else None
