"""The contract of a PEFT method: what one registered spec declares (numpy only; the torch half is in exporters/methods).

A method owns some slot kinds (``lora_A``, ``bias``, ``ia3_l`` ...); generic code finds a slot's
method through its kind and asks the method for everything that differs between methods: which slots
a model gets, their start and neutral values, how several deltas mix in one inference call, and the
space the hub averages them in.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from edgepeft.errors import DeltaError, ExportError
from edgepeft.manifest import Slot


def option(default: Any, help: str) -> Any:
    """A config field with a default and a help string (shown by ``edgepeft export --help``)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class MethodConfig:
    """Base of a method's options. Subclasses add fields made with :func:`option`; ``__post_init__`` refuses bad values."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any], method: str) -> "MethodConfig":
        """A config from ``{field: value}``; values may be strings (from ``--method-config KEY=VALUE``)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in options.items():
            if key not in known:
                raise ExportError(f"--method-config {method}.{key}: {method} has no such option; it takes: {', '.join(known) or 'none'}")
            values[key] = _coerce(value, known[key], method)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def help(cls) -> list[tuple[str, str]]:
        return [(f.name, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]


def _coerce(value: Any, f: dataclasses.Field, method: str) -> Any:
    kind = str(f.type)
    where = f"--method-config {method}.{f.name}={value}"
    if value is None or (isinstance(value, str) and value.lower() in ("none", "") and "None" in kind):
        return None
    try:
        if "tuple" in kind:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        if "bool" in kind:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if "int" in kind and "float" not in kind:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if "float" in kind:
            out = float(value)
            if not math.isfinite(out):
                raise ValueError(value)
            return out
        return str(value)
    except (TypeError, ValueError):
        raise ExportError(f"{where}: expected {kind.replace(' | None', '')}") from None


@dataclass(frozen=True)
class ModelView:
    """What a method may know about the model while it plans slots (no torch)."""

    linears: Mapping[str, tuple[int, int]]  # module path -> (in, out) of every linear-like module
    in_scope: Callable[[str], bool]  # the module is in a trained layer (--top-layers)
    defaults: Mapping[str, tuple[str, ...]]  # the family's defaults, e.g. "lora.targets" -> ("query", "value")
    head: bool  # a classification head is trained
    # issue 14: what virtual-token methods plan from (0 where a caller does not say)
    hidden: int = 0  # the model's hidden size (width of a token embedding)
    layers: int = 0  # transformer layers
    kv_heads: int = 0  # key/value heads per layer
    head_dim: int = 0  # width of one head
    max_length: int = 0  # --max-length: positions a call may use, virtual tokens included
    # Convolutional models (exporters/modules.py): a Conv2d is linear-like with in = in_channels/groups * kh * kw, so
    # the LoRA family's (r, in) x (out, r) factors, mixes and ΔW space hold unchanged; these say what else it is.
    norms: Mapping[str, int] = field(default_factory=dict)  # BatchNorm module path -> channels
    groups: Mapping[str, int] = field(default_factory=dict)  # grouped (depthwise) convolution path -> groups
    no_bias: frozenset[str] = frozenset()  # linear-like modules without a bias of their own (BitFit leaves them)

    def default(self, key: str) -> tuple[str, ...]:
        return tuple(self.defaults.get(key, ()))


def matches(module: str, pattern: str) -> bool:
    """PEFT's rule: a pattern matches a module whose path equals it or ends with '.' + it; regex if it has one of ^$*[(|."""
    import re

    if any(c in pattern for c in "^$*[(|"):
        return re.fullmatch(pattern, module) is not None
    return module == pattern or module.endswith("." + pattern)


def select(view: ModelView, patterns: tuple[str, ...], method: str, option_name: str) -> list[str]:
    """The linear modules in scope that match ``patterns``; a pattern that matches no module at all is refused."""
    for p in patterns:
        if not any(matches(n, p) for n in view.linears):
            sample = ", ".join(sorted(view.linears)[:6])
            raise ExportError(f"--method-config {method}.{option_name}: pattern {p!r} matches no linear module; "
                              f"modules look like: {sample}, ...")
    return [n for n in view.linears if any(matches(n, p) for p in patterns) and view.in_scope(n)]


def kaiming_uniform(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """torch's kaiming_uniform_(a=sqrt(5)) on a (rows, fan_in) matrix, as PEFT inits LoRA A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    b = 1.0 / math.sqrt(shape[1])
    return rng.uniform(-b, b, size=shape).astype(np.float32)


Tensors = dict[str, np.ndarray]  # one module's slots of one method, keyed by kind


class Method(ABC):
    """One PEFT method. Subclasses set the class attributes and implement :meth:`plan`; the rest has defaults
    that fit an additive vector method (neutral zeros, mixed by weighted sum, averaged as is)."""

    name: ClassVar[str]  # the --method word
    kinds: ClassVar[tuple[str, ...]]  # slot kinds this method owns (a kind has exactly one owner)
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    ranked: ClassVar[bool] = False  # its slots carry the delta's rank and alpha (meta.rank, meta.alpha)
    mixable: ClassVar[bool] = True  # several deltas (or a weight other than 1) may be mixed in one call
    peft_type: ClassVar[str | None] = None  # PEFT's peft_type when PEFT has the method
    auto_tasks: ClassVar[tuple[str, ...]] = ()  # tasks whose bundles get this method whether named or not (the head)
    exact_mean: ClassVar[bool] = True  # the hub's mean in its space is the mean of the dense updates (VeRA: only with a shared d)
    needs_base: ClassVar[bool] = False  # its aggregation space depends on the module's frozen weight (DoRA's row norms)
    peft_keys: ClassVar[Mapping[str, str]] = {}  # slot kind -> PEFT's tensor name on the module (no adapter name)
    peft_shared: ClassVar[tuple[str, ...]] = ()  # frozen bundle tensors PEFT's file also holds, as base_model.<name> (VeRA's A, B)
    # issue 14: where the method's slots enter the model instead of a module: "sequence" (virtual tokens before the
    # user's, PEFT's prompt learning) or "prefix" (keys and values at the head of every layer's cache); None: a module.
    virtual: ClassVar[str | None] = None
    varied_ranks: ClassVar[bool] = False  # its modules may hold different ranks in one delta (AdaLoRA): a rank axis each
    peft_rank: ClassVar[str | None] = None  # adapter_config.json key of the rank when it is not LoRA's "r" (AdaLoRA: init_r)

    @abstractmethod
    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        """Every slot of this method on the model; refuses (ExportError naming the option) what does not fit."""

    # ---- per slot -------------------------------------------------------------------------------

    def fill(self, kind: str) -> float:
        """The constant that leaves the base model unchanged (0 for additive deltas, 1 for scales)."""
        return 0.0

    def neutral(self, slot: Slot) -> np.ndarray:
        """The inference-graph value that computes the base model."""
        return np.full(slot.shape, self.fill(slot.kind), np.float32)

    def infer_axis(self, kind: str) -> int | None:
        """The axis of a slot that is dynamic in model.onnx (a mix concatenates along it), or None."""
        return None

    def ndim(self, kind: str) -> int:
        """Number of dimensions of a slot of ``kind``."""
        return 1

    def init(self, slot: Slot, rng: np.random.Generator) -> np.ndarray:
        """A fresh value for training (``slot.init`` names how)."""
        if slot.init == "kaiming_uniform":
            return kaiming_uniform(slot.shape, rng)
        return np.full(slot.shape, 1.0 if slot.init == "ones" else 0.0, np.float32)

    def check_shape(self, slot: Slot, got: tuple[int, ...], for_training: bool) -> str | None:
        """What is wrong with a tensor of shape ``got`` for ``slot`` (None: it fits)."""
        return None if got == slot.shape else _shape(slot.shape)

    def check_module(self, module: str, tensors: Tensors, meta_rank: int, where: str) -> None:
        """Checks across one module's slots of this method (pairs, shared ranks); nothing by default."""

    # ---- inference mixes --------------------------------------------------------------------------

    def fold(self, slot: Slot, t: np.ndarray, scale: float) -> np.ndarray:
        """The inference feed of one delta's slot at weight 1 (the graph has no LoRA scale: fold it in here)."""
        return t

    def mix(self, slot: Slot, parts: list[np.ndarray], weights: list[float], scales: list[float]) -> np.ndarray:
        """The inference feed of ``slot`` for a weighted mix of deltas (one delta at weight 1: its feed)."""
        if not self.mixable and (len(parts) > 1 or weights != [1.0]):
            raise DeltaError(f"{self.name} deltas cannot be mixed or weighted in one call ({slot.module}): "
                             "use one adapter at weight 1, or merge them into one delta first")
        fill = np.float32(self.fill(slot.kind))
        out = np.full(slot.shape, fill, np.float32)
        for t, w in zip(parts, weights):
            out += (t - fill) * np.float32(w) if fill else t * np.float32(w)
        return out

    # ---- PEFT mapping -------------------------------------------------------------------------------

    def peft_config(self, modules: Mapping[str, set[str]], options: Mapping[str, Any]) -> dict[str, Any]:
        """adapter_config.json fields this method adds, given {module: its slot kinds of this method} and the
        method's options as the manifest records them (``method_config``)."""
        return {}

    def peft_fields(self, modules: Mapping[str, Tensors], options: Mapping[str, Any]) -> dict[str, Any]:
        """adapter_config.json fields for a delta's tensors ({module: {kind: tensor}}); by default :meth:`peft_config`."""
        return self.peft_config({m: set(t) for m, t in modules.items()}, options)

    def check_peft_config(self, cfg: Mapping[str, Any], options: Mapping[str, Any], where: str) -> None:
        """Refuse (DeltaError) a PEFT adapter config this bundle's slots cannot hold; nothing by default."""

    def to_peft(self, kind: str, t: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
        """A slot's value as PEFT stores it (``weight``: the module's frozen (out, in) weight when ``needs_base``)."""
        return t

    def from_peft(self, kind: str, v: np.ndarray, weight: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`to_peft`; ``shape``: the slot's shape."""
        return v

    # ---- device training -------------------------------------------------------------------------------

    def train_hook(self, slots: list[Slot], options: Mapping[str, Any], total_steps: int) -> Any:
        """An object the trainer calls around a run of ``total_steps`` (AdaLoRA's rank budget), or None. It has
        ``after_step(params, grads, step)``, ``finish(tensors) -> tensors`` (the delta that travels),
        ``describe() -> {metadata key: str}``, ``state() -> arrays`` and ``load(arrays)`` for checkpoints.
        Raises TrainError (before anything is written) when the run cannot serve it."""
        return None

    # ---- hub aggregation ----------------------------------------------------------------------------

    def to_space(self, module: str, tensors: Tensors, scale: float, base: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The update of one module in the space the hub averages in, float64, keyed by a name unique in the delta.
        Default: each slot minus its neutral value, keyed by slot name. ``base``: the module's frozen weight
        (out, in), given only to methods that declare ``needs_base``."""
        return {f"{module}.{k}": t.astype(np.float64) - self.fill(k) for k, t in tensors.items()}

    def to_space_factored(self, module: str, tensors: Tensors, scale: float, base: np.ndarray | None = None
                          ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
        """:meth:`to_space` with its matrix-product parts left unmultiplied: (plain parts, {key: (L, R)} where the part
        is L @ R), so a merge sums many deltas' products as one larger product. Default: every part plain."""
        return self.to_space(module, tensors, scale, base), {}

    def from_space(self, module: str, space: dict[str, np.ndarray], rank: int, scale: float,
                   base: np.ndarray | None = None) -> tuple[Tensors, float]:
        """Inverse of :meth:`to_space` (re-factoring where needed): (slots by kind, relative fit error)."""
        prefix = module + "."
        return {k[len(prefix):]: (v + self.fill(k[len(prefix):])).astype(np.float32) for k, v in space.items()}, 0.0

    def lerp(self, module: str, parent: Tensors | None, delta: Tensors, lam: float, scales: tuple[float, float],
             base: np.ndarray | None = None) -> Tensors:
        """parent + lam * (delta - parent) exactly in the method's space (parent None: the neutral value).
        ``scales``: (the delta's, the parent's) LoRA scale."""
        out = {}
        for k, t in delta.items():
            base = parent[k] if parent is not None else np.full_like(t, self.fill(k))
            out[k] = (base + lam * (t - base)).astype(np.float32)
        return out


def _shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in s) + ("," if len(s) == 1 else "") + ")"
