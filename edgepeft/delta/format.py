"""The delta file: a safetensors file of float32 tensors named by slot, with its facts in the metadata.

``load_delta`` checks everything before it returns, so nothing is half-applied: the header against
the buffer (``safeio``), the metadata, a checksum, finiteness, each method's own checks (LoRA shape
pairing), and, given a manifest, the base fingerprint, slot set and shapes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepeft import atomic
from edgepeft.delta import safeio
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest
from edgepeft import methods
from edgepeft.names import LORA_A, LORA_B, is_safe_name, slot_kinds, slot_name, split_slot_name

FORMAT = "edgepeft-delta"
FORMAT_VERSION = "1"


def now_iso() -> str:
    """Current UTC time as ISO 8601, second precision."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class DeltaMeta:
    """Facts about a delta: which base it fits, how it scales, where it sits in an adapter's history."""

    base_fingerprint: str
    method: str = "lora"  # the bundle's method string (lora, lora+bitfit, ia3+head ...)
    rank: int = 0  # LoRA rank of every LoRA module in the file (0 if none)
    alpha: float = 0.0  # LoRA alpha; the update is (alpha / rank) * B @ A
    adapter: str = "default"  # adapter name on the hub
    version: int = 0  # adapter version this delta is (the hub assigns it)
    parent: int | None = None  # adapter version it was trained from
    samples: int = 0  # training samples behind it: the default aggregation weight
    creator: str = ""  # device id, "hub", "merge", "peft"
    created: str = field(default_factory=now_iso)  # ISO 8601 UTC
    extra: dict[str, str] = field(default_factory=dict)  # free-form facts (e.g. training loss)

    @property
    def scale(self) -> float:
        """LoRA scaling alpha / rank (1.0 when rank is 0)."""
        return self.alpha / self.rank if self.rank else 1.0


@dataclass
class Delta:
    """What a device learned: float32 tensors keyed by slot name, plus their meta."""

    tensors: dict[str, np.ndarray]
    meta: DeltaMeta

    @property
    def scale(self) -> float:
        """LoRA scaling alpha / rank (1.0 when rank is 0)."""
        return self.meta.scale

    def lora_modules(self) -> list[str]:
        """Modules that carry a LoRA pair, sorted."""
        return sorted(split_slot_name(n)[0] for n in self.tensors if n.endswith("." + LORA_A))

    def delta_w(self, module: str) -> np.ndarray:
        """The full update scale * B @ A of one LoRA module, (out, in), float64."""
        a = self.tensors[slot_name(module, LORA_A)].astype(np.float64)
        b = self.tensors[slot_name(module, LORA_B)].astype(np.float64)
        return self.scale * (b @ a)


def checksum(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over name, shape and little-endian bytes of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        h.update(name.encode("utf-8") + b"\0" + json.dumps(list(a.shape)).encode() + b"\0")
        h.update(a.tobytes())
    return h.hexdigest()


# ---- meta <-> safetensors string metadata -------------------------------------------------------

def meta_to_strings(meta: DeltaMeta) -> dict[str, str]:
    """Meta fields as the str -> str map safetensors metadata allows."""
    return {
        "base_fingerprint": meta.base_fingerprint,
        "method": meta.method,
        "rank": str(meta.rank),
        "alpha": repr(float(meta.alpha)),
        "adapter": meta.adapter,
        "version": str(meta.version),
        "parent": "" if meta.parent is None else str(meta.parent),
        "samples": str(meta.samples),
        "creator": meta.creator,
        "created": meta.created,
        "extra": json.dumps(meta.extra, sort_keys=True),
    }


def _int(where: str, key: str, text: str, *, optional: bool = False) -> int | None:
    if optional and text == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise DeltaError(f"{where}: metadata {key!r} is {text!r}; expected a non-negative integer")
    return int(text)


def meta_from_strings(md: dict[str, str], where: str) -> DeltaMeta:
    """Parse and check meta fields written by :func:`meta_to_strings`."""
    missing = sorted({"base_fingerprint", "rank", "alpha", "adapter", "version", "samples"} - set(md))
    if missing:
        raise DeltaError(f"{where}: metadata lacks {', '.join(missing)}")
    try:
        alpha = float(md["alpha"])
    except ValueError:
        raise DeltaError(f"{where}: metadata 'alpha' is {md['alpha']!r}; expected a number") from None
    if not math.isfinite(alpha):
        raise DeltaError(f"{where}: metadata 'alpha' is {alpha}; expected a finite number")
    try:
        extra = json.loads(md.get("extra", "{}"))
    except ValueError:
        extra = None
    if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise DeltaError(f"{where}: metadata 'extra' must be a JSON object of strings")
    if not is_safe_name(md["adapter"]):
        raise DeltaError(f"{where}: metadata 'adapter' is {md['adapter']!r}; not a safe name")
    return DeltaMeta(
        base_fingerprint=md["base_fingerprint"],
        method=md.get("method", ""),
        rank=_int(where, "rank", md["rank"]),
        alpha=alpha,
        adapter=md["adapter"],
        version=_int(where, "version", md["version"]),
        parent=_int(where, "parent", md.get("parent", ""), optional=True),
        samples=_int(where, "samples", md["samples"]),
        creator=md.get("creator", ""),
        created=md.get("created", ""),
        extra=extra,
    )


# ---- checks -------------------------------------------------------------------------------------

def _shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in s) + ("," if len(s) == 1 else "") + ")"


def check_structure(delta: Delta, where: str) -> None:
    """Manifest-free checks: slot names, dtype, dims per kind, finite values, then each method's own checks
    on each module (LoRA: A/B pairs sharing rank meta.rank)."""
    for name in sorted(delta.tensors):
        t = delta.tensors[name]
        try:
            _, kind = split_slot_name(name)
        except DeltaError:
            raise DeltaError(f"{where}: tensor {name!r} is not a slot name (<module>.<{'|'.join(slot_kinds())}>)") from None
        if t.dtype != np.float32:
            raise DeltaError(f"{where}: tensor {name!r} has dtype {t.dtype}; deltas are float32")
        want_ndim = methods.owner(kind).ndim(kind)
        if t.ndim != want_ndim:
            raise DeltaError(f"{where}: tensor {name!r} has shape {_shape(t.shape)}; a {kind} slot is {want_ndim}-D")
        if not np.isfinite(t).all():
            bad = int(t.size - np.isfinite(t).sum())
            raise DeltaError(f"{where}: tensor {name!r} has {bad} non-finite value(s) (NaN or Inf)")
    for module, groups in methods.by_module(delta.tensors).items():
        for method, kinds in groups.items():
            method.check_module(module, {k: delta.tensors[n] for k, n in kinds.items()}, delta.meta.rank, where)


def check_against_manifest(delta: Delta, manifest: Manifest, where: str, *, for_training: bool = False) -> None:
    """Check base fingerprint, slot set and shapes against a bundle manifest."""
    fp = delta.meta.base_fingerprint
    if fp != manifest.fingerprint:
        raise DeltaError(f"{where}: delta is for base {fp[:16]}, bundle is {manifest.fingerprint[:16]}")
    want = {s.name for s in manifest.slots}
    have = set(delta.tensors)
    if want != have:
        parts = []
        if want - have:
            parts.append("missing " + ", ".join(sorted(want - have)))
        if have - want:
            parts.append("extra " + ", ".join(sorted(have - want)))
        raise DeltaError(f"{where}: slots do not match the bundle: {'; '.join(parts)}")
    for s in manifest.slots:
        got = delta.tensors[s.name].shape
        need = methods.owner(s.kind).check_shape(s, got, for_training)
        if need is not None:
            raise DeltaError(f"{where}: tensor {s.name!r} has shape {_shape(got)}, bundle slot needs {need}")


def check_shapes(shapes: dict[str, tuple[int, ...]], meta: DeltaMeta, manifest: Manifest, where: str, *,
                 for_training: bool = False) -> None:
    """:func:`check_against_manifest` on names and shapes alone, before any tensor is read or decompressed.

    The tensors are zero-strided views (no memory), so exactly the check decoded deltas get runs here.
    """
    shells = {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}
    check_against_manifest(Delta(shells, meta), manifest, where, for_training=for_training)


def header_cap(manifest: Manifest | None) -> int:
    """Most header bytes a reader parses: safetensors' own cap, or, given a manifest, room for its slots and meta."""
    if manifest is None:
        return safeio.MAX_HEADER_BYTES
    return 64 * 1024 + sum(2 * len(s.name) + 96 for s in manifest.slots)


def max_file_bytes(manifest: Manifest) -> int:
    """Largest delta file that fits ``manifest`` (float32 at the bundle's shapes, plus its header): an upload cap."""
    return 8 + header_cap(manifest) + 4 * manifest.trainable_numbers


# ---- save / load --------------------------------------------------------------------------------

def delta_bytes(delta: Delta) -> bytes:
    """The safetensors bytes of a delta file."""
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in delta.tensors.items()}
    md = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta_to_strings(delta.meta),
        "slots": json.dumps(sorted(tensors)),
        "checksum": checksum(tensors),
    }
    return safeio.save(tensors, md)


def save_delta(path: str | os.PathLike, delta: Delta) -> None:
    """Write ``delta`` to ``path`` atomically, after the same structural checks the reader makes."""
    check_structure(delta, os.fspath(path))
    atomic.write_bytes(path, delta_bytes(delta))


def file_meta(data: bytes, where: str, manifest: Manifest | None = None) -> DeltaMeta:
    """The meta of delta-file bytes, reading only the (capped) header."""
    return meta_from_strings(safeio.parse_header(data, where, max_header=header_cap(manifest)).metadata, where)


def _from_buffer(buf: bytes | mmap.mmap, where: str, manifest: Manifest | None, *, for_training: bool, copy: bool) -> Delta:
    """Parse and fully check delta-file bytes (or a read-only memory map of them)."""
    header = safeio.parse_header(buf, where, max_header=header_cap(manifest))
    md = header.metadata
    if md.get("format") != FORMAT:
        raise DeltaError(f"{where}: metadata 'format' is {md.get('format')!r}; not an {FORMAT} file")
    if md.get("format_version") != FORMAT_VERSION:
        raise DeltaError(
            f"{where}: delta format version {md.get('format_version')!r}; this edgepeft reads {FORMAT_VERSION!r}"
        )
    meta = meta_from_strings(md, where)
    names = sorted(e.name for e in header.entries)
    if md.get("slots") != json.dumps(names):
        raise DeltaError(f"{where}: metadata 'slots' does not list the file's tensors")
    if manifest is not None:  # refuse a delta for another bundle before touching its data
        check_shapes({e.name: e.shape for e in header.entries}, meta, manifest, where, for_training=for_training)
    tensors = safeio.view_arrays(buf, header)  # read-only views: nothing is copied unless asked
    if md.get("checksum") != checksum(tensors):
        raise DeltaError(f"{where}: checksum mismatch; the file is corrupt or was edited")
    delta = Delta(tensors, meta)
    check_structure(delta, where)
    if manifest is not None:
        check_against_manifest(delta, manifest, where, for_training=for_training)
    if copy:
        delta = Delta({k: np.array(v) for k, v in tensors.items()}, meta)
    return delta


def delta_from_bytes(data: bytes, where: str, manifest: Manifest | None = None, *, for_training: bool = False) -> Delta:
    """Parse and fully check delta-file bytes; ``where`` names them in errors. The tensors are writable copies."""
    return _from_buffer(data, where, manifest, for_training=for_training, copy=True)


def load_delta(path: str | os.PathLike, manifest: Manifest | None = None, *, for_training: bool = False) -> Delta:
    """Read a delta file and check everything (and, given a manifest, that it fits the bundle)."""
    p = Path(os.fspath(path))
    where = p.name
    if not p.is_file():
        raise DeltaError(f"{p}: no such delta file")
    return delta_from_bytes(p.read_bytes(), where, manifest, for_training=for_training)


def map_delta(path: str | os.PathLike, manifest: Manifest | None = None) -> Delta:
    """Like :func:`load_delta`, but the tensors are read-only views of a memory map of the file.

    Everything is checked before this returns (reading every page once, for the checksum). The map
    stays valid while a tensor refers to it; files written with ``edgepeft.atomic`` are replaced by
    rename, never rewritten in place, so a newer version does not change a mapped one.
    """
    p = Path(os.fspath(path))
    if not p.is_file():
        raise DeltaError(f"{p}: no such delta file")
    with open(p, "rb") as f:
        if os.fstat(f.fileno()).st_size < 8:
            raise DeltaError(f"{p.name}: truncated ({os.fstat(f.fileno()).st_size} bytes; a safetensors file has at least 8)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return _from_buffer(mm, p.name, manifest, for_training=False, copy=False)


def delta_from_init(manifest: Manifest, seed: int, adapter: str = "default") -> Delta:
    """A fresh delta for ``manifest``, each slot initialized as its method declares (LoRA A kaiming-uniform as
    PEFT does, IA3 scales ones, everything else zeros)."""
    ranks = {(s.rank, s.alpha) for s in manifest.slots if s.rank}
    if len(ranks) > 1:
        raise DeltaError(f"manifest: LoRA slots disagree on (rank, alpha): {sorted(ranks)}; a delta has one scale")
    rank, alpha = ranks.pop() if ranks else (0, 0.0)
    rng = np.random.default_rng(seed)
    # manifest order keeps the random stream stable
    tensors = {s.name: methods.owner(s.kind).init(s, rng) for s in manifest.slots}
    meta = DeltaMeta(base_fingerprint=manifest.fingerprint, method=manifest.method, rank=rank, alpha=alpha, adapter=adapter)
    return Delta(tensors, meta)


def replace_meta(delta: Delta, **changes: object) -> Delta:
    """A delta sharing tensors with ``delta`` and with some meta fields changed."""
    return Delta(delta.tensors, dataclasses.replace(delta.meta, **changes))
