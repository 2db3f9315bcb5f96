"""Fit training into a memory budget: measure one step, extrapolate, choose batch, length and session settings.

The model is deliberately simple and measured, not guessed: with the bundle, the data and both
sessions loaded, run a probe step at batch 1 and batch 2 at the longest sequence length with the
onnxruntime arena off and read the process's peak RSS for each. Peak grows about linearly in
batch x tokens at these lengths (attention's quadratic term only makes the extrapolation to shorter
batches conservative), so

    peak(b, T) ~= fixed + per_token * b * T,   per_token = (peak(2, L) - peak(1, L)) / L.

The plan then picks the largest micro-batch that fits (gradient accumulation keeps the requested
batch), shortens the longest sequences only when batch 1 does not fit, and turns the arena on only
when twice the activation memory still fits (the arena keeps freed blocks and grows in doubling
chunks). Thread count is left as asked: each thread's scratch memory is negligible next to activations.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from edgepeft.errors import TrainError
from edgepeft.runtime.bundle import SessionConfig

MB = 1024 * 1024
HEADROOM = 0.95  # plan to 95 % of the budget: the probe is one measurement, Python allocates a little more later
ARENA_FACTOR = 2.0
MIN_LENGTH = 16  # never truncate examples below this many tokens to fit a budget

_peak_before_reset_mb = 0.0  # ru_maxrss is reset with the kernel's peak counter; remember what it was


def _ru_maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MB if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (ru_maxrss, across the probe's counter resets)."""
    return max(_peak_before_reset_mb, _ru_maxrss_mb())


def rss_mb() -> float:
    """Current resident memory of this process in MB (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError, IndexError):
        return _ru_maxrss_mb()


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not allowed."""
    global _peak_before_reset_mb
    before = peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    _peak_before_reset_mb = before
    return True


def peak_during(fn: Callable[[], object]) -> float:
    """Peak RSS in MB while ``fn`` runs: the kernel's counter where it can be reset, else a 1 ms sampler."""
    if _reset_peak():
        fn()
        return _ru_maxrss_mb()
    peak, done = [rss_mb()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], rss_mb())


@dataclass(frozen=True)
class MemoryPlan:
    """What a memory budget chose, and the measurements behind the choice."""

    budget_mb: float
    micro_batch: int  # examples per train-graph run; a larger --batch-size accumulates gradients
    max_length: int  # examples longer than this are truncated (the data's longest unless the budget forbids)
    session: SessionConfig
    fixed_mb: float  # measured: process with bundle, data and sessions, plus a step's size-independent part
    per_token_mb: float  # measured: train-step memory per example-token
    estimate_mb: float  # predicted peak of a micro-batch at max_length (arena included)

    def describe(self) -> str:
        """One line for the run's summary."""
        return (f"budget {self.budget_mb:.0f} MB: micro-batch {self.micro_batch}, up to {self.max_length} tokens, "
                f"arena {'on' if self.session.arena else 'off'}, estimated peak {self.estimate_mb:.0f} MB")


def plan_memory(budget_mb: float, *, batch_size: int, longest: int, measure: Callable[[int, int], float],
                threads: int = 0) -> MemoryPlan:
    """Choose micro-batch, max length and arena for ``budget_mb``; ``measure(b, T)`` is a probe step's peak in MB.

    Raises TrainError with the measured minimum when even batch size 1 cannot fit.
    """
    if budget_mb <= 0:
        raise TrainError(f"--memory-budget must be a positive number of MB, got {budget_mb:g}")
    measure(1, longest)  # warm-up: the first run allocates once-only buffers
    p1, p2 = measure(1, longest), measure(2, longest)
    per_token = max(p2 - p1, 0.0) / longest
    fixed = p1 - per_token * longest
    target = budget_mb * HEADROOM

    def peak(b: int, t: int, arena: bool = False) -> float:
        return fixed + per_token * b * t * (ARENA_FACTOR if arena else 1.0)

    floor = min(MIN_LENGTH, longest)
    length = longest
    while peak(1, length) > target and length > floor:
        length = max(floor, length // 2)
    if peak(1, length) > target:
        need = peak(1, floor) / HEADROOM
        raise TrainError(
            f"memory budget {budget_mb:g} MB is too small: batch size 1 needs about {need:.0f} MB here "
            f"(measured {fixed:.0f} MB for the bundle, data and sessions plus {per_token * 1024:.1f} KB per token); "
            f"use --memory-budget {need:.0f} or more")
    micro = batch_size if per_token == 0 else max(1, min(batch_size, int((target - fixed) / (per_token * length))))
    arena = peak(micro, length, arena=True) <= target
    session = SessionConfig(threads=threads, arena=arena)
    return MemoryPlan(budget_mb, micro, length, session, round(fixed, 1), per_token,
                      round(peak(micro, length, arena), 1))


def unlimited_plan(batch_size: int, longest: int, session: SessionConfig) -> MemoryPlan:
    """The plan when no budget is given: the whole batch at once, nothing truncated, the session as asked."""
    return MemoryPlan(0.0, batch_size, longest, session, 0.0, 0.0, 0.0)
