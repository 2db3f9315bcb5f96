"""What prompt tuning, P-tuning and prefix tuning share: V virtual tokens that enter the model's input, not a module.

Their slots live on one pseudo-module (``names.PROMPT_MODULE``). One slot per method has V rows (the
*token* slot: the prompt, the encoder's input embedding, or the prefix); its row count is dynamic in
model.onnx, and zero rows is the neutral value: no virtual token at all is exactly the base model. A
causal LM's KV cache carries the virtual tokens after the first call, so the runtime feeds them only
then (:func:`after_prefill`). Several prompts do not add up to one (a sum of soft prompts is no
model's prompt), so these methods neither mix nor have an exact mean.

PEFT stores one tensor for all three, ``prompt_embeddings``: what the model sees (the encoder's output
where there is an encoder), so :meth:`VirtualTokens.to_peft_prompt` runs the encoder in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from edgepeft.errors import DeltaError, ExportError
from edgepeft.manifest import Slot
from edgepeft.methods.base import Method, MethodConfig, ModelView, Tensors, kaiming_uniform, option
from edgepeft.names import PROMPT_MODULE, slot_name


@dataclass(frozen=True)
class VirtualConfig(MethodConfig):
    num_virtual_tokens: int = option(20, "Virtual tokens V (PEFT's num_virtual_tokens); they count against --max-length.")

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ExportError(f"--method-config num_virtual_tokens: must be a positive integer, got {self.num_virtual_tokens}")


class VirtualTokens(Method):
    """A method whose slots are virtual tokens; subclasses name ``token_kind`` and plan the encoder, if any."""

    token_kind: ClassVar[str]  # the slot with V rows (dynamic in model.onnx, empty when neutral)
    matrices: ClassVar[tuple[str, ...]] = ()  # kinds with two dimensions (the rest are bias vectors)
    mixable = False
    exact_mean = False
    config_cls = VirtualConfig

    def tokens(self, view: ModelView, config: MethodConfig) -> int:
        """V, refused (naming the options) when --max-length leaves no room for the user's tokens."""
        assert isinstance(config, VirtualConfig)
        v = config.num_virtual_tokens
        if view.max_length and v >= view.max_length:
            raise ExportError(f"--method-config {self.name}.num_virtual_tokens={v}: --max-length {view.max_length} "
                              f"leaves room for at most {view.max_length - 1} virtual tokens (they take positions "
                              "from the user's tokens); lower num_virtual_tokens or raise --max-length")
        return v

    def slot(self, kind: str, shape: tuple[int, ...], init: str = "zeros") -> Slot:
        return Slot(slot_name(PROMPT_MODULE, kind), kind, PROMPT_MODULE, shape, init=init)

    def ndim(self, kind: str) -> int:
        return 2 if kind == self.token_kind or kind in self.matrices else 1

    def infer_axis(self, kind: str) -> int | None:
        return 0 if kind == self.token_kind else None

    def neutral(self, slot: Slot) -> np.ndarray:
        if slot.kind == self.token_kind:
            return np.zeros((0, slot.shape[1]), np.float32)
        return np.zeros(slot.shape, np.float32)

    def init(self, slot: Slot, rng: np.random.Generator) -> np.ndarray:
        """PEFT's starts: embeddings N(0, 1) (torch.nn.Embedding), weights kaiming-uniform (torch.nn.Linear), biases 0.
        A prompt with a text init draws N(0, 1) here too: runtime/prompt_init.py replaces it where the bundle is at hand."""
        if slot.init in ("normal", "text"):
            return rng.standard_normal(slot.shape).astype(np.float32)
        if slot.init == "kaiming_uniform":
            return kaiming_uniform(slot.shape, rng)
        return np.zeros(slot.shape, np.float32)

    # ---- PEFT: one prompt_embeddings tensor -------------------------------------------------------

    def to_peft_prompt(self, t: Tensors) -> np.ndarray:
        """The ``prompt_embeddings`` PEFT's adapter file holds for these slots (keyed by kind)."""
        return t[self.token_kind]

    def from_peft_prompt(self, v: np.ndarray, shapes: Mapping[str, tuple[int, ...]], where: str) -> Tensors:
        """Slots (by kind) from PEFT's ``prompt_embeddings``; ``shapes``: the bundle's slot shapes by kind."""
        if len(shapes) > 1:
            raise DeltaError(f"{where}: PEFT's {self.peft_type} adapter holds only the encoder's output prompt_embeddings, "
                             f"not the encoder the {self.name} bundle trains; export the bundle without the encoder "
                             "(prompt, or prefix with projection=false) to read it")
        want = shapes[self.token_kind]
        if tuple(v.shape) != want:
            raise DeltaError(f"{where}: prompt_embeddings has shape {tuple(v.shape)}; the bundle's {self.name} slot needs {want} "
                             "(num_virtual_tokens x width)")
        return {self.token_kind: v.astype(np.float32)}

    def peft_prompt_config(self, manifest_config: Mapping[str, Any], t: Tensors) -> dict[str, Any]:
        """adapter_config.json fields beyond the common prompt-learning ones."""
        return {}


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)
