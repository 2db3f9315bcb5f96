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

from edgepeft import atomic, schema
from edgepeft.errors import BundleError
from edgepeft.names import MANIFEST_FILE, TASKS, is_safe_name, slot_kinds

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
    chat_template: str | None = None  # causal LM: the chat template as device-renderable pieces (names.CHAT_TEMPLATE_FILE)
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
    def from_json(cls, text: str | bytes, where: str = MANIFEST_FILE) -> "Manifest":
        """Parse and strictly check manifest JSON (types, ranges, sizes, depth, file names); BundleError in one line."""
        try:
            d = schema.loads(text, max_bytes=MAX_MANIFEST_BYTES)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise BundleError(f"{where}: not an edgepeft bundle manifest (format != {FORMAT!r})")
            if d.get("version") != VERSION:
                raise BundleError(
                    f"{where}: bundle format version {schema.short(d.get('version'))}, this edgepeft reads {VERSION}; "
                    "re-export the bundle or upgrade edgepeft"
                )
            known = {f.name for f in dataclasses.fields(cls)} | {"format", "version"}
            for k in sorted(set(d) - known):
                warnings.warn(f"{where}: unknown key {k[:64]!r} ignored", stacklevel=2)
            return cls(**_manifest_fields(schema.Fields(d)))
        except schema.SchemaError as e:
            raise BundleError(f"{where}: {e}") from None


MAX_MANIFEST_BYTES = 64 * 2**20
MAX_SLOTS = 1 << 16
_DIM = 1 << 31


def _file_name(v: str) -> bool:
    """A bundle file is named, never pathed: flat, no '..', no leading dot, printable."""
    return is_safe_name(v) and len(v) <= 255


FILE_WHAT = "a plain file name inside the bundle (no '/', '..' or leading '.')"


def _slot(raw: object, i: int) -> Slot:
    f = schema.Fields(raw, f"slots[{i}].")
    kinds = slot_kinds()
    kind = f.text("kind", 32, check=lambda k: k in kinds, what=f"one of {', '.join(kinds)}")
    shape = f.items("shape", 4)
    # the exact shape is the owning method's business (delta/format.py checks it against the model); here: sane
    if not shape or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < _DIM for x in shape):
        raise f.bad("shape", f"must be 1 to 4 non-negative integers, got {schema.short(shape)}")
    return Slot(name=f.text("name", 512, check=is_safe_name, what="a safe slot name"), kind=kind,
                module=f.text("module", 512), shape=tuple(shape),
                dtype=f.text("dtype", 16, check=lambda t: t == "float32", what="'float32'", default="float32", required=False),
                rank=f.integer("rank", 0, 1 << 16, default=0, required=False),
                alpha=f.number("alpha", -1e9, 1e9, default=0.0, required=False),
                init=f.text("init", 32, default="zeros", required=False))


def _graph(raw: object, key: str) -> Graph:
    f = schema.Fields(raw, f"graphs.{key}.")
    names = []
    for part in ("inputs", "outputs"):
        items = f.items(part, MAX_SLOTS + 64)
        if not all(isinstance(x, str) and 0 < len(x) <= 512 for x in items):
            raise f.bad(part, "must be a list of names (strings of 1..512 characters)")
        names.append(tuple(items))
    return Graph(f.text("file", 255, check=_file_name, what=FILE_WHAT), *names)


def _manifest_fields(f: schema.Fields) -> dict[str, Any]:
    """Constructor arguments of a Manifest from its checked JSON fields."""
    graphs = f.typed("graphs", dict)
    if len(graphs) > 8 or not all(isinstance(k, str) and k.isidentifier() for k in graphs):
        raise f.bad("graphs", "must map at most 8 graph kinds (e.g. infer, train) to graphs")
    labels = f.items("labels", 1 << 20, default=[], required=False)
    if not all(isinstance(x, str) and len(x) <= 256 for x in labels):
        raise f.bad("labels", "must be a list of strings")
    layers = f.items("train_layers", 4096, default=None, required=False, nullable=True)
    if layers is not None and not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 16 for x in layers):
        raise f.bad("train_layers", "must be a list of layer numbers or null")
    eos = f.obj.get("eos_token_id")
    if eos is not None:
        f.integer("eos_token_id", 0, 1 << 24)
    return dict(
        fingerprint=f.text("fingerprint", 64, check=lambda v: len(v) == 64 and all(c in "0123456789abcdef" for c in v),
                           what="64 lowercase hex digits (sha256)"),
        source=f.text("source"), architecture=f.text("architecture", 256), model_type=f.text("model_type", 256),
        task=f.text("task", 64, check=lambda t: t in TASKS, what=f"one of {', '.join(TASKS)}"),
        method=f.text("method", 64), quantization=f.text("quantization", 64),
        max_length=f.integer("max_length", 1, 1 << 20), vocab_size=f.integer("vocab_size", 1, 1 << 24),
        pad_token_id=f.integer("pad_token_id", 0, 1 << 24),
        slots=tuple(_slot(s, i) for i, s in enumerate(f.items("slots", MAX_SLOTS))),
        graphs={k: _graph(g, k) for k, g in graphs.items()},
        labels=tuple(labels), eos_token_id=eos,
        tokenizer=f.text("tokenizer", 255, check=_file_name, what=FILE_WHAT, default=None, required=False, nullable=True),
        weights=f.text("weights", 255, check=_file_name, what=FILE_WHAT, default="weights.bin", required=False),
        chat_template=f.text("chat_template", 255, check=_file_name, what=FILE_WHAT, default=None, required=False,
                             nullable=True),
        train_layers=None if layers is None else tuple(layers),
        extra=f.typed("extra", dict, default={}, required=False),
        method_config=_method_config(f),
    )


def _method_config(f: schema.Fields) -> dict[str, dict[str, Any]]:
    """Per method, its options as exported (older bundles: {}); each method's config class checks the values."""
    raw = f.typed("method_config", dict, default={}, required=False)
    if len(raw) > 16 or not all(isinstance(k, str) and k.isidentifier() and isinstance(v, dict) for k, v in raw.items()):
        raise f.bad("method_config", "must map method names to objects of their options")
    return raw


def files_of(manifest: Manifest) -> list[str]:
    """Every file a manifest names (graphs, weights, tokenizer), each once: a flat name inside the bundle."""
    names = [g.file for g in manifest.graphs.values()] + [manifest.weights] + [
        f for f in (manifest.tokenizer, manifest.chat_template) if f]
    return list(dict.fromkeys(names))


def write_manifest(bundle_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``manifest.json`` into ``bundle_dir`` atomically."""
    atomic.write_text(Path(os.fspath(bundle_dir)) / MANIFEST_FILE, manifest.to_json())


def read_manifest(bundle_dir: str | os.PathLike) -> Manifest:
    """Read and check ``manifest.json`` of a bundle directory."""
    bundle_dir = Path(os.fspath(bundle_dir))
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    if path.is_symlink() or not path.is_file():
        why = "a link (bundle files must be regular files)" if path.is_symlink() else "missing"
        raise BundleError(f"{path}: {why}; is {bundle_dir} a bundle made by `edgepeft export`?")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes, over the {MAX_MANIFEST_BYTES}-byte cap for a manifest")
    return Manifest.from_json(path.read_bytes(), where=str(path))
