"""How a training process allocates: glibc told to give large freed blocks back, and onnxruntime's shared, capped arena.

By default glibc raises its mmap threshold after each large free, so a step's activations come
from a heap that keeps what it freed and fragments: RSS stays at the largest step seen and grows
past it, and peak memory stops being a function of the batch. Measured on a tiny BERT at batch
1200: a 233 MB peak becomes 131 MB, and memory returns to the baseline after each step; SmolLM2-135M's
train step without arena or pattern peaks at 859 MB instead of 1841 MB (results/llm_memory.json).
"""

from __future__ import annotations

import ctypes
import sys

import onnxruntime as ort

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters
MMAP_FROM = 256 * 1024  # blocks this large come from mmap and go back to the system when freed
TRIM_FROM = 1024 * 1024  # the heap's free top is returned once it exceeds this


def _mallopt():
    """glibc's mallopt, or None where there is none (another OS, another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def lean_allocator() -> bool:
    """Have glibc serve blocks of 256 KB and more with mmap and trim freed memory; False where that is not possible.

    Process-wide and idempotent; it costs a page fault per fresh large block, which a train step's
    compute dwarfs."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_FROM)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_FROM))


def one_malloc_arena() -> bool:
    """Have glibc serve every thread from the one heap; False where that is not possible.

    By default each thread that allocates gets a heap of its own and keeps what it freed there: --data-parallel's
    worker threads held 11 MB more at the peak than one thread running the same steps (EfficientNet-Lite0, 64 px,
    two micro-batches of 16), and none more with one heap. The steps allocate little outside onnxruntime's arena, so
    one heap's lock costs nothing measurable. Process-wide; call it before the threads start."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, 1))


_arena_cap_mb = 0.0  # the cap of the shared arena registered last (0: none yet)


def shared_arena(cap_mb: float) -> None:
    """Register onnxruntime's process-wide CPU arena, grown by exactly what is asked (kSameAsRequested) up to ``cap_mb``.

    Sessions built with ``session.use_env_allocators`` share it: a train step keeps its activations' memory for the
    next step (no page faults again, as with the lean allocator alone) and evaluation reuses it, yet the arena
    never holds more than the cap: onnxruntime fails an allocation beyond it instead (runtime/memory.py sizes the
    cap and tries it). Registering again with the same cap keeps the arena; another cap makes a new one for the
    sessions built after it (those built before keep theirs)."""
    global _arena_cap_mb
    if cap_mb == _arena_cap_mb:
        return
    mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(mem, ort.OrtArenaCfg({"max_mem": int(cap_mb * 1024 * 1024), "arena_extend_strategy": 1}))
    _arena_cap_mb = cap_mb
