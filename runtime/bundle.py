"""Open a bundle on the device: read the manifest, check the files, build onnxruntime sessions."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import onnxruntime as ort

from edgepeft.errors import BundleError
from edgepeft.names import CAUSAL_LM, CNN_INPUTS, WEIGHTS_INDEX_FILE
from edgepeft.runtime.allocator import lean_allocator, shared_arena
from edgepeft.manifest import Manifest, files_of, read_manifest
from edgepeft.onnx_prune import prune_outputs
from edgepeft.onnx_refs import check_reads_only


@dataclass(frozen=True)
class SessionConfig:
    """onnxruntime settings that trade speed for memory (the memory budget picks these); ``None``: the graph's default."""

    threads: int = 0  # 0 = onnxruntime's default (all cores)
    arena: bool | None = None  # the CPU memory arena: faster, but keeps peak memory reserved
    mem_pattern: bool | None = None  # onnxruntime's memory pattern: one block planned per input shape
    optimization: str = "all"  # basic | extended | all
    arena_cap_mb: float = 0.0  # > 0: the process's shared arena capped at this many MB (runtime/allocator.py), not its own
    dequantize_at_load: bool | None = None  # int8 weights dequantized once when the session is built (see graph_defaults)

    def for_graph(self, kind: str, task: str) -> "SessionConfig":
        """These settings with every ``None`` replaced by the default for a ``kind`` graph of a ``task`` bundle."""
        arena, pattern = graph_defaults(kind, task)
        return replace(self, arena=arena if self.arena is None else self.arena,
                       mem_pattern=pattern if self.mem_pattern is None else self.mem_pattern,
                       dequantize_at_load=(task in CNN_INPUTS if self.dequantize_at_load is None else self.dequantize_at_load))

    def options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = self.arena is not False
        so.enable_mem_pattern = self.mem_pattern is not False
        if self.arena_cap_mb:
            so.enable_cpu_mem_arena = True
            so.add_session_config_entry("session.use_env_allocators", "1")
        so.log_severity_level = 3
        # onnxruntime fuses a quantized weight feeding a MatMul directly (GPT-2's Conv1D; Linear weights pass a
        # Transpose first) into MatMulNBits, which by default quantizes the activations to int8 too (accuracy
        # level 4): logits and gradients then drift ~1e-3 from the bundle's own weights. Level 1 keeps the packed
        # weights and computes in float32, as every other graph here does.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        if self.dequantize_at_load:
            # Constant folding then turns each int8 weight's DequantizeLinear into a float32 initializer: onnxruntime's
            # convolutions take their fast (NCHWc, BatchNorm-fused) path only on constant weights, and a CNN's
            # weights are small next to its activations. EfficientNet-Lite0's bn+head step on one thread: 57 -> 48 ms of
            # CPU, peak no higher (the per-step copies were live too; benchmarks/results/cnn_session.json).
            # Transformers keep int8 in memory: their weights are most of it.
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        so.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        return so


def graph_defaults(kind: str, task: str) -> tuple[bool, bool]:
    """(arena, memory pattern) for a graph, as measured (benchmarks/llm_memory.py, results/llm_memory.json).

    A causal LM's train step has tensors that come and go in a long, uneven sequence; onnxruntime's memory
    pattern for it held far more than the step's live tensors (SmolLM2-135M: 1561 MB peak with it, 902 MB
    without, as fast), so its train session plans no pattern. A causal LM's model.onnx scores the whole vocabulary
    (a 256-token row's logits are 50 MB) and is called between train steps for validation: with the
    arena on, what it reserved stays resident under the next train step (SmolLM2-135M: 628 MB after
    four calls, 224 MB without the arena), so it runs without arena or pattern. Other tasks' graphs keep
    onnxruntime's defaults (both on), under which their figures were measured."""
    if task != CAUSAL_LM:
        return True, True
    return (True, False) if kind == "train" else (False, False)  # train: the arena is as small as without it, and faster


NUMPY_WEIGHT_TYPES = ("float32", "int8", "int64", "int32", "bool")  # weights.json dtypes numpy reads as they are


@dataclass(frozen=True)
class Bundle:
    """A bundle directory whose manifest has been read and whose files exist."""

    path: Path
    manifest: Manifest

    def graph_path(self, kind: str) -> Path:
        return self.path / self.manifest.graphs[kind].file

    def session(self, kind: str, config: SessionConfig = SessionConfig(), *,
                outputs: Iterable[str] | None = None) -> ort.InferenceSession:
        """An onnxruntime session for the ``infer`` or ``train`` graph; a broken graph is a BundleError. ``outputs``: only
        these outputs and the nodes they need (edgepeft/onnx_prune.py: a train step's backward pass stops earlier)."""
        path = self.graph_path(kind)
        config = config.for_graph(kind, self.manifest.task)
        if kind == "train" or not config.arena:  # freed activations go back to the system (runtime/allocator.py)
            lean_allocator()
        if config.arena_cap_mb:
            shared_arena(config.arena_cap_mb)
        options = config.options()
        for name, value in self.shared_weights.items():
            options.add_initializer(name, value)
        try:
            if outputs is None:
                sess = ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])
            else:  # from bytes: onnxruntime is told where the graph's external weights lie
                options.add_session_config_entry("session.model_external_initializers_file_folder_path", os.fspath(self.path))
                sess = ort.InferenceSession(prune_outputs(path.read_bytes(), set(outputs)), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors for corrupt files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{path}: cannot be loaded by onnxruntime ({first[:200]})") from None
        expected = set(self.manifest.graphs[kind].inputs)
        actual = {i.name for i in (*sess.get_inputs(), *sess.get_overridable_initializers())}  # slots have defaults
        if expected != actual:
            diff = sorted(expected ^ actual)[:3]
            raise BundleError(f"{path}: graph inputs differ from manifest.json (e.g. {', '.join(diff)}); the bundle is inconsistent")
        sess.shared_weights = self.shared_weights  # the session reads these buffers: they live as long as it does
        return sess

    @cached_property
    def shared_weights(self) -> dict[str, ort.OrtValue]:
        """weights.bin's tensors as OrtValues over one read-only memory map, handed to every session of this bundle.

        onnxruntime maps a graph's external weights itself, per session and tensor, and resident pages count once
        per mapping: model.onnx and train.onnx together showed the weights twice in RSS (SmolLM2-135M int8: 135 MB
        more at the train step's peak). int4 tensors have no numpy type and stay onnxruntime's to map."""
        try:
            index = json.loads((self.path / WEIGHTS_INDEX_FILE).read_text())["tensors"]
        except (OSError, ValueError, KeyError):  # no index (an older bundle): onnxruntime maps the file itself
            return {}
        data = np.memmap(self.path / self.manifest.weights, dtype=np.uint8, mode="r")
        return {name: ort.OrtValue.ortvalue_from_numpy(
                    data[t["offset"]:t["offset"] + t["length"]].view(t["dtype"]).reshape(t["shape"]))
                for name, t in index.items() if t["dtype"] in NUMPY_WEIGHT_TYPES}


def open_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read and check a bundle directory: every file it names is a regular file inside it (links are refused);
    ``verify`` also checks the weights against the fingerprint and that both graphs read exactly those weights."""
    path = Path(os.fspath(path))
    manifest = read_manifest(path)
    for name in files_of(manifest):
        inside(path, name)
    if verify:
        weights = path / manifest.weights
        if sha256_file(weights) != manifest.fingerprint:
            raise BundleError(f"{weights}: content does not match the manifest fingerprint; the bundle is corrupt")
        for graph in manifest.graphs.values():
            check_reads_only((path / graph.file).read_bytes(), manifest.weights, str(path / graph.file))
    return Bundle(path, manifest)


def inside(bundle_dir: Path, name: str) -> Path:
    """``bundle_dir / name`` if it is a regular file directly inside the bundle, not a link; else BundleError."""
    p = bundle_dir / name
    if p.is_symlink():
        raise BundleError(f"{p}: is a link; bundle files must be regular files inside the bundle")
    if not p.is_file():
        raise BundleError(f"{p}: missing; re-copy or re-export the bundle")
    if p.resolve().parent != bundle_dir.resolve():  # the manifest names flat files; this holds even if that check moved
        raise BundleError(f"{p}: lies outside the bundle directory")
    return p


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
