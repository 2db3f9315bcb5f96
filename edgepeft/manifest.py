"""The bundle manifest (``manifest.json``): what the device needs to know about a bundle.

Written once by the exporter, read by the runtime, the delta validator and the hub. JSON with sorted
keys and a format version; unknown keys warn by name, missing required keys fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgepeft import atomic
from edgepeft.errors import BundleError
from edgepeft.names import MANIFEST_FILE, TASKS, slot_kinds

FORMAT = "edgepeft-bundle"
VERSION = 1


@dataclass(frozen=True)
class Slot:
    """One trainable delta tensor: its name (from ``names.slot_name``), shape, and how it starts."""

    name: str
    kind: str  # a kind some registered method owns (names.slot_kinds())
    module: str  # module path in the source model
    shape: tuple[int, ...]  # shape in train.onnx; LoRA slots have a dynamic rank in model.onnx
    dtype: str = "float32"
    rank: int = 0  # LoRA-family rank (0 for other slots)
    alpha: float = 0.0  # LoRA-family alpha; the update is (alpha / rank) * B @ A
    init: str = "zeros"  # zeros | ones | kaiming_uniform

    def __post_init__(self) -> None:
        if self.kind not in slot_kinds():
            raise BundleError(f"slot {self.name!r}: unknown kind {self.kind!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def scale(self) -> float:
        """LoRA scaling factor alpha / rank (1 for other kinds)."""
        return self.alpha / self.rank if self.rank else 1.0

    @property
    def neutral_shape(self) -> tuple[int, ...]:
        """Shape of the value that leaves the base model unchanged (rank 0 for LoRA, else the full shape)."""
        return tuple(neutral_values([self])[self.name].shape)


def neutral_values(slots: Iterable[Slot]) -> dict[str, np.ndarray]:
    """Per slot, the inference-graph value that computes the base model, as its method declares it
    (rank-0 LoRA A/B, zero bias and head deltas, IA3 scales of one)."""
    from edgepeft.methods import owner  # the registry imports this module

    return {s.name: owner(s.kind).neutral(s) for s in slots}


@dataclass(frozen=True)
class Graph:
    """One ONNX graph of the bundle and its input and output names."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """Everything about a bundle except the weights themselves."""

    fingerprint: str  # sha256 of the frozen weights as stored (weights.bin)
    source: str  # where the base model came from
    architecture: str  # e.g. BertForSequenceClassification
    model_type: str  # e.g. bert
    task: str  # names.TASKS
    method: str  # registered method names joined by '+' (edgepeft.methods.parse): lora, lora+bitfit, ia3+head ...
    quantization: str  # none | int8 | int4
    max_length: int
    vocab_size: int
    pad_token_id: int
    slots: tuple[Slot, ...]
    graphs: dict[str, Graph]  # "infer" and "train"
    labels: tuple[str, ...] = ()
    eos_token_id: int | None = None
    tokenizer: str | None = None
    weights: str = "weights.bin"
    train_layers: tuple[int, ...] | None = None  # layers whose slots train (None = all)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form facts (sizes, export time)
    method_config: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method, its config (older bundles: {})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BundleError(f"manifest: unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        names = [s.name for s in self.slots]
        if len(set(names)) != len(names):
            raise BundleError("manifest: duplicate slot names")

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise BundleError(f"manifest: no slot named {name!r}")

    @property
    def trainable_numbers(self) -> int:
        n = 0
        for s in self.slots:
            size = 1
            for d in s.shape:
                size *= d
            n += size
        return n

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d = {"format": FORMAT, "version": VERSION, **d}
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_FILE) -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BundleError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BundleError(f"{where}: not an edgepeft bundle manifest (format != {FORMAT!r})")
        if d.get("version") != VERSION:
            raise BundleError(
                f"{where}: bundle format version {d.get('version')!r}, this edgepeft reads {VERSION}; "
                "re-export the bundle or upgrade edgepeft"
            )
        d = {k: v for k, v in d.items() if k not in ("format", "version")}
        known = {f.name for f in dataclasses.fields(cls)}
        for k in sorted(set(d) - known):
            warnings.warn(f"{where}: unknown key {k!r} ignored", stacklevel=2)
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise BundleError(f"{where}: missing required key(s) {', '.join(missing)}")
        try:
            d = {k: v for k, v in d.items() if k in known}
            d["slots"] = tuple(Slot(**s) for s in d["slots"])
            d["graphs"] = {k: Graph(g["file"], tuple(g["inputs"]), tuple(g["outputs"])) for k, g in d["graphs"].items()}
            d["labels"] = tuple(d.get("labels", ()))
            if d.get("train_layers") is not None:
                d["train_layers"] = tuple(d["train_layers"])
            return cls(**d)
        except (TypeError, KeyError) as e:
            raise BundleError(f"{where}: malformed ({e})") from None


def write_manifest(bundle_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``manifest.json`` into ``bundle_dir`` atomically."""
    atomic.write_text(Path(os.fspath(bundle_dir)) / MANIFEST_FILE, manifest.to_json())


def read_manifest(bundle_dir: str | os.PathLike) -> Manifest:
    """Read and check ``manifest.json`` of a bundle directory."""
    bundle_dir = Path(os.fspath(bundle_dir))
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing; is {bundle_dir} a bundle made by `edgepeft export`?")
    return Manifest.from_json(path.read_text(encoding="utf-8"), where=str(path))
