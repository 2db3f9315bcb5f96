"""Fit training into a memory budget: measure probe steps, extrapolate, choose batch, length and session settings.

The model is deliberately simple and measured, not guessed: with the bundle, the data and both
sessions loaded, run probe steps at batch 1, 2, 4, ... at the longest sequence length with the
onnxruntime arena off, reading the process's peak RSS for each, and stop doubling before a probe
would come near the budget. Peak grows about linearly in batch x tokens at these lengths
(attention's quadratic term only makes the extrapolation to shorter batches conservative), so

    peak(b, T) ~= fixed + per_token * b * T,   per_token = slope over the widest probe spread / L.

Two probes at batch 1 and 2 alone are not enough: the allocator's slack hides a small step's growth.
glibc is told to give large freed blocks back (``runtime/allocator.py``, whenever a train session is built), without
which peak memory depends on the history of step sizes more than on the current one.

The plan then picks the largest micro-batch that fits at the longest length and caps every run at
that many example-tokens, so batches of shorter examples run with more of them at once (gradient
accumulation keeps the requested batch either way); it shortens the longest sequences only when
batch 1 does not fit, and turns the arena on only when twice the activation memory still fits (the
arena keeps freed blocks and grows in doubling chunks). Thread count is left as asked: each thread's scratch memory is negligible next to activations.

Where the train step's inputs have one shape (a CNN's images or clips: ``sized_arena``), a budget always gets the
process's shared arena, capped at what the budget leaves above the fixed part (runtime/allocator.py): the step
keeps its activations' memory from one step to the next, as an arena does, where arena off with the lean allocator
faulted them in again every step (the KWS CNN's step: 2.6-3.1x torch's, results/speech.json before), and the cap
keeps it inside the budget by construction. onnxruntime's own arena is not used there even when twice the
activations fit: it grows in doubling chunks, one arena per session (train and evaluation), and the factor of two
missed that (EfficientNet-Lite0, 64 px, batch 32, --memory-budget 180: planned 131 MB, peaked 230 MB; the capped
shared arena peaked at 163 MB at the same step CPU time). The trainer tries the capped arena on a
micro-batch before training and falls back to arena off if onnxruntime refuses an allocation under the cap.
Variable-length text keeps arena off: a capped arena holding regions of past shapes could refuse a later one mid-run.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

from edgepeft.errors import TrainError
from edgepeft.runtime.bundle import SessionConfig

MB = 1024 * 1024
HEADROOM = 0.9  # plan to 90 % of the budget: probes are single measurements (a step's peak varies ~5 %)
ARENA_FACTOR = 2.0
# A probe runs only when predicted to stay under this share of the planned peak (HEADROOM is the margin below the
# budget). A share below 1 stopped the probes before any growth was seen whenever the process's fixed memory alone
# passed it (--select auto's every-layer graph: 159 MB at batch 1 and 2 against 0.8 x 180; the slope read as zero,
# the whole batch was planned with the arena on, and the run peaked at 287 MB under a 200 MB budget).
PROBE_LIMIT = 1.0
MIN_LENGTH = 16  # never truncate examples below this many tokens to fit a budget

_peak_before_reset_mb = 0.0  # the kernel's peak counter is reset by each probe; remember what it was


def _own_peak_mb() -> float:
    """This process's peak RSS: Linux's VmHWM, else ru_maxrss.

    ru_maxrss survives exec, so a process started by a big parent (a test runner holding torch) would
    report the parent's peak as its own; VmHWM belongs to this process's own address space.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MB if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (across the probe's counter resets)."""
    return max(_peak_before_reset_mb, _own_peak_mb())


def rss_mb() -> float:
    """Current resident memory of this process in MB (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError, IndexError):
        return _own_peak_mb()


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
        return _own_peak_mb()
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
    micro_batch: int  # examples per train-graph run at max_length; a larger --batch-size accumulates gradients
    max_length: int  # examples longer than this are truncated (the data's longest unless the budget forbids)
    session: SessionConfig
    fixed_mb: float  # measured: process with bundle, data and sessions, plus a step's size-independent part
    per_token_mb: float  # measured: train-step memory per example-token
    estimate_mb: float  # predicted peak of a micro-batch at max_length (arena included)
    max_tokens: int = 0  # examples x padded length per train-graph run (0: whole batches fit at any length)

    def describe(self) -> str:
        """One line for the run's summary."""
        runs = f" (up to {self.max_tokens} example-tokens a run)" if self.max_tokens else ""
        arena = f"capped at {self.session.arena_cap_mb:.0f} MB" if self.session.arena_cap_mb else "on" if self.session.arena else "off"
        return (f"budget {self.budget_mb:.0f} MB: micro-batch {self.micro_batch}{runs}, up to {self.max_length} tokens, "
                f"arena {arena}, estimated peak {self.estimate_mb:.0f} MB")


def plan_memory(budget_mb: float, *, batch_size: int, longest: int, measure: Callable[[int, int], float],
                threads: int = 0, sized_arena: bool = False) -> MemoryPlan:
    """Choose micro-batch, max length and arena for ``budget_mb``; ``measure(b, T)`` is a probe step's peak in MB.
    ``sized_arena``: the inputs have one shape, so a capped shared arena may stand in for arena off (module docstring).

    Raises TrainError with the measured minimum when even batch size 1 cannot fit.
    """
    if budget_mb <= 0:
        raise TrainError(f"--memory-budget must be a positive number of MB, got {budget_mb:g}")
    target = budget_mb * HEADROOM
    fixed, per_token, seen = _fit(measure, batch_size, longest, target)

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
    # no growth measured: nothing to extrapolate from, so no more examples a run than a probe ran within the target
    micro = seen if per_token == 0 else max(1, min(batch_size, int((target - fixed) / (per_token * length))))
    arena = peak(micro, length, arena=True) <= target
    session = SessionConfig(threads=threads, arena=arena)
    estimate = peak(micro, length, arena)
    if sized_arena:  # the arena may hold everything the budget leaves above the fixed part, no more
        session = SessionConfig(threads=threads, arena=True, arena_cap_mb=round(target - fixed, 1))
        estimate = target
    # length buckets: a batch of shorter examples may run more of them at once within the same token count
    tokens = micro * length if micro < batch_size else 0
    return MemoryPlan(budget_mb, micro, length, session, round(fixed, 1), per_token, round(estimate, 1), tokens)


def without_arena(plan: MemoryPlan) -> MemoryPlan:
    """The plan with arena off (the lean allocator alone): where onnxruntime refused an allocation under the cap."""
    return replace(plan, session=replace(plan.session, arena=False, arena_cap_mb=0.0),
                   estimate_mb=round(plan.fixed_mb + plan.per_token_mb * plan.micro_batch * plan.max_length, 1))


def _fit(measure: Callable[[int, int], float], batch_size: int, longest: int, target: float) -> tuple[float, float, int]:
    """(fixed MB, MB per example-token, the largest batch probed within ``target``, at least 1) from probes at
    batch 1, 2, 4, ... at the longest length.

    Batches double while the line through the last two probes predicts the next one stays within
    PROBE_LIMIT of the target: at a few examples the allocator's slack hides the real slope, so the
    slope comes from the widest spread measured (and the steepest recent one, to stay conservative).
    """
    measure(1, longest)  # warm-up: the first run allocates once-only buffers
    sizes, peaks = [1, 2], [measure(1, longest), measure(2, longest)]
    while sizes[-1] < batch_size:
        b, nxt = sizes[-1], min(2 * sizes[-1], batch_size)
        slope = max(peaks[-1] - peaks[-2], 0.0) / (b - sizes[-2])
        if peaks[-1] + slope * (nxt - b) > PROBE_LIMIT * target:
            break
        sizes.append(nxt)
        peaks.append(measure(nxt, longest))
    wide = (peaks[-1] - peaks[0]) / (sizes[-1] - sizes[0])
    recent = (peaks[-1] - peaks[-2]) / (sizes[-1] - sizes[-2])
    per_token = max(wide, recent, 0.0) / longest
    seen = max((b for b, p in zip(sizes, peaks) if p <= target), default=1)
    return peaks[0] - per_token * longest, per_token, seen


def unlimited_plan(batch_size: int, longest: int, session: SessionConfig) -> MemoryPlan:
    """The plan when no budget is given: the whole batch at once, nothing truncated, the session as asked."""
    return MemoryPlan(0.0, batch_size, longest, session, 0.0, 0.0, 0.0)
