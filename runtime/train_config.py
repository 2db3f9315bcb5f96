"""What a device training run takes (``TrainConfig``: every field a CLI option with its help) and what it reports.

Kept apart from the loop (``runtime/trainer.py``) so the CLI and the device agent read the options without the loop.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepeft.delta import Delta
from edgepeft.errors import TrainError
from edgepeft.names import CNN_INPUTS
from edgepeft.runtime import memory
from edgepeft.runtime.optim import ADAM_EPS, SCHEDULES, SGD, AdamW, build_optimizer


MIN_PARALLEL_MICRO_BATCH = 8  # --data-parallel 0 cuts a CNN batch into runs of no fewer examples


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """How to train; every field has a default and a help string (the CLI's options come from these)."""

    epochs: int = _help(3, "Passes over the training data.")
    max_steps: int = _help(0, "Stop after this many optimizer steps (0: run all epochs); also sets the schedule length.")
    batch_size: int = _help(16, "Examples per optimizer step (before --grad-accum).")
    lr: float = _help(2e-3, "Peak learning rate of the optimizer.")
    weight_decay: float = _help(0.01, "Weight decay: decoupled with AdamW, added to the gradient with SGD (as torch does).")
    warmup: float = _help(0.0, "Warmup: a fraction of all steps if below 1, else a number of steps.")
    schedule: str = _help("linear", "Decay after warmup: linear, cosine or constant.")
    grad_accum: int = _help(1, "Batches whose gradients are summed into one optimizer step.")
    micro_batch: int = _help(0, "Most examples per train-graph run; larger batches accumulate gradients (0: whole batch; a memory budget may lower it).")
    max_grad_norm: float = _help(1.0, "Clip gradients to this global L2 norm (0: no clipping).")
    seed: int = _help(0, "Seed of the data order and of a fresh delta's LoRA A init.")
    balance_labels: bool = _help(False, "Classification: draw each epoch's examples so every label is equally likely "
                                        "(with replacement); for label-skewed local data, as a fleet device's often is.")
    optimizer: str = _help("adamw", "adamw, or sgd (steps proportional to the gradient: a fleet device whose loss is "
                                    "already small moves the shared adapter little; needs a larger --lr, e.g. 0.5).")
    momentum: float = _help(0.0, "SGD's momentum, as torch's (0: none).")
    adam_eps: float = _help(ADAM_EPS, "AdamW's epsilon; a larger one (e.g. 1e-4) makes its first steps proportional to small "
                                      "gradients instead of sign-like.")
    prox: float = _help(0.0, "Proximal pull toward the starting delta (FedProx's mu): a fleet device's update stays near "
                             "the version it pulled. Decoupled with AdamW (like its weight decay), the gradient of "
                             "prox/2*||w - w0||^2 with SGD (0: off).")
    logit_adjust: float = _help(0.0, "Classification: train on logits shifted by this times the log of the local label "
                                     "prior (logit adjustment, as FedLC does; 1: balanced softmax), so a label-skewed fleet "
                                     "device does not teach the fleet its own label prior; the delta predicts with plain "
                                     "logits (0: off).")
    rank: int = _help(0, "LoRA rank to train, at most the bundle's (0: the starting delta's, else the bundle's); a lower rank "
                         "trains the bundle's graph with the factors past it held at zero, so the delta is that rank exactly.")
    eval_every: int = _help(0, "Evaluate on the validation data every N steps (0: at the end of each epoch).")
    patience: int = _help(0, "Stop after N evaluations without improvement (0: never stop early).")
    checkpoint_every: int = _help(100, "Write a checkpoint every N steps (and always at the end).")
    memory_budget_mb: float = _help(0.0, "Peak memory budget in MB; chooses micro-batch, max length and arena (0: no budget).")
    threads: int = _help(0, "onnxruntime intra-op threads (0: all cores).")
    data_parallel: int = _help(0, "Micro-batches run at once, the --threads shared among them (data parallel inside a "
                                  "step: each batch is cut into at least this many, their gradients summed as one "
                                  "batch's; peak memory holds this many micro-batches; a text batch under a memory "
                                  "budget is cut by tokens as planned instead). 0: one per thread for an image or "
                                  "audio bundle, whose small convolution steps keep a second core busy this way where "
                                  "onnxruntime's intra-op threads do not (micro-batches of 8 or more), else 1.")
    adapter: str = _help("", "Adapter name written into the delta (default: the starting delta's, else 'default').")
    creator: str = _help("device", "Creator written into the delta (e.g. a device id).")
    select: str = _help("all", "Slots to train: all, or auto (a short probe ranks modules by gradient and keeps the best "
                               "that fit --max-delta-bytes; the rest stay neutral).")
    max_delta_bytes: int = _help(0, "With --select auto: the most float32 bytes the trained slots may hold.")

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        for name, v in positive.items():
            if v < 1:
                raise TrainError(f"{name.replace('_', '-')} must be at least 1, got {v}")
        for name in ("max_steps", "micro_batch", "eval_every", "patience", "checkpoint_every", "threads", "warmup",
                     "weight_decay", "max_grad_norm", "memory_budget_mb", "rank", "data_parallel"):
            if getattr(self, name) < 0:
                raise TrainError(f"{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"lr must be a positive number, got {self.lr}")
        if not (self.logit_adjust >= 0 and math.isfinite(self.logit_adjust)):
            raise TrainError(f"logit-adjust must be a non-negative number, got {self.logit_adjust}")
        if self.logit_adjust and self.balance_labels:  # balanced draws already make the prior seen uniform
            raise TrainError("--logit-adjust and --balance-labels both correct for skewed labels; choose one")
        if self.select not in ("all", "auto"):
            raise TrainError(f"--select {self.select!r}: choose all or auto")
        if (self.select == "auto") != (self.max_delta_bytes > 0):
            raise TrainError("--select auto and --max-delta-bytes go together: give both (or neither)")
        self.make_optimizer({})  # an unknown optimizer, or an option of the other one, is refused here
        if self.schedule not in SCHEDULES:
            raise TrainError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def parallel_runs(self, task: str) -> int:
        """How many micro-batches run at once for a ``task`` bundle: --data-parallel, or its automatic choice."""
        if self.data_parallel:
            return self.data_parallel
        if task not in CNN_INPUTS:  # a transformer's large matrix products already keep every intra-op thread busy
            return 1
        return max(1, min(self.threads or os.cpu_count() or 1, self.batch_size // MIN_PARALLEL_MICRO_BATCH))

    def make_optimizer(self, params: dict[str, np.ndarray]) -> AdamW | SGD:
        """This run's optimizer over ``params`` (the prox anchor is their values now)."""
        return build_optimizer(self.optimizer, params, weight_decay=self.weight_decay, prox=self.prox,
                               momentum=self.momentum, adam_eps=self.adam_eps)

    def resume_identity(self) -> dict[str, Any]:
        """Fields a resumed run must share with the checkpoint (all that change what is computed)."""
        d = dataclasses.asdict(self)
        # the same gradients however many cores compute them: a run may resume on another device's core count
        for k in ("checkpoint_every", "creator", "data_parallel"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class Progress:
    """What the loop reports after each step (and with ``metrics`` after each evaluation)."""

    step: int
    total: int
    epoch: int
    loss: float
    lr: float
    steps_per_s: float
    eta_s: float
    metrics: dict[str, float] | None = None


@dataclass
class TrainSummary:
    """The numbers a run ends with."""

    steps: int
    total_steps: int
    epochs_done: int
    samples: int  # training examples seen (each epoch counts again)
    seconds: float
    steps_per_s: float
    peak_rss_mb: float
    train_loss: float  # mean over the last 20 steps
    before: dict[str, float] | None  # validation metrics of the starting delta
    after: dict[str, float] | None  # validation metrics of the returned delta
    best_step: int | None  # the step of the returned delta; the starting step when nothing beat the start
    stopped_early: bool
    resumed_at: int | None  # step the run resumed from, if it did
    memory: memory.MemoryPlan
    selection: str | None = None  # what --select auto chose


@dataclass
class TrainResult:
    delta: Delta
    summary: TrainSummary
