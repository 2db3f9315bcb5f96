"""The device training loop: train.onnx for loss and gradients, numpy AdamW for the update.

Everything a run depends on (bundle, data, starting delta, config) is checked before the first step.
The data order of every epoch comes from one seeded generator whose state is checkpointed with the
deltas, the moments and the position in the epoch, so a resumed run replays exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from edgepeft import methods
from edgepeft.delta import Delta, delta_from_init
from edgepeft.delta import ranks
from edgepeft.delta.format import checksum, now_iso
from edgepeft.errors import TrainError
from edgepeft.names import (ATTENTION_MASK, AUDIO_CLS, CNN_INPUTS, IGNORED_LABEL, INPUT_IDS, LABELS, LOSS, SEQ_CLS, TOKEN_CLS,
                            grad_name)
from edgepeft.runtime import checkpoint as ckpt
from edgepeft.runtime import allocator, logit_adjust, memory
from edgepeft.runtime.bundle import Bundle, SessionConfig
from edgepeft.runtime.data import Dataset, plan_batches, split_batch, split_by_tokens
from edgepeft.runtime.evaluate import evaluate, score
from edgepeft.runtime.audio import AudioSpec
from edgepeft.runtime.audio_data import AudioDataset
from edgepeft.runtime.image_data import ImageDataset
from edgepeft.runtime.images import ImageSpec
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.prompt_init import with_text_init
from edgepeft.runtime.held_slots import HeldSlots, probe_selection
from edgepeft.runtime.lm_targets import LOSS_MASK, first_target, loss_chunks, scored, train_feeds
from edgepeft.runtime.optim import clip_by_global_norm, lr_at
from edgepeft.runtime.train_config import Progress, TrainConfig, TrainResult, TrainSummary  # noqa: F401 (their home for callers)


def _cnn_input_shape(manifest) -> tuple[int, int, int]:
    """(C, H, W) of one example of a convolutional bundle: an image's, or a clip's log-mel features."""
    if manifest.task == AUDIO_CLS:
        return AudioSpec.of(manifest).input_shape
    i = ImageSpec.of(manifest)
    return i.channels, i.height, i.width


class Trainer:
    """Trains the delta slots of one bundle on one dataset."""

    def __init__(self, bundle: Bundle, train: Dataset | ImageDataset | AudioDataset, config: TrainConfig | None = None, *,
                 val: Dataset | ImageDataset | AudioDataset | None = None,
                 start: Delta | None = None, checkpoint_dir: str | os.PathLike | None = None,
                 on_progress: Callable[[Progress], None] | None = None) -> None:
        m, config = bundle.manifest, config or TrainConfig()
        for d in (train, val):
            if d is not None and d.task != m.task:
                raise TrainError(f"{d.path}: data read for {d.task}, the bundle is {m.task}")
        if config.balance_labels and getattr(train, "labels", None) is None:
            raise TrainError(f"--balance-labels needs labels per example; {m.task} data has none")
        self.shift = logit_adjust.bias_shift(m, getattr(train, "labels", None), config.logit_adjust)
        self.bundle, self.manifest, self.train, self.val, self.config = bundle, m, train, val, config
        self.start = start
        self.checkpoint_dir = None if checkpoint_dir is None else Path(os.fspath(checkpoint_dir))
        self.on_progress = on_progress or (lambda p: None)
        batches = -(-len(train) // config.batch_size)
        self.steps_per_epoch = -(-batches // config.grad_accum)
        total = config.epochs * self.steps_per_epoch
        self.total = min(total, config.max_steps) if config.max_steps else total
        self.full_rank = ranks.bundle_rank(m)
        self.rank = config.rank or (start.meta.rank if start is not None and start.meta.rank else self.full_rank)
        if self.full_rank and self.rank > self.full_rank:
            raise TrainError(f"rank {self.rank} is above the bundle's LoRA rank {self.full_rank}; choose at most {self.full_rank}")
        if start is not None and start.meta.rank and start.meta.rank != self.rank:
            raise TrainError(f"the starting delta has rank {start.meta.rank}, this run trains rank {self.rank}; "
                             f"pull the version at rank {self.rank} (edgepeft pull --rank {self.rank}) or train at {start.meta.rank}")
        # methods that act between steps (AdaLoRA's rank budget); each refuses a run it cannot serve, before anything is written
        owners = {methods.owner(s.kind): None for s in m.slots}
        self.hooks = [h for meth in owners if (h := meth.train_hook([s for s in m.slots if methods.owner(s.kind) is meth],
                                                                    m.method_config.get(meth.name, {}), self.total)) is not None]
        self.parallel = config.parallel_runs(m.task)  # micro-batches run at once (--data-parallel)
        self.pool: ThreadPoolExecutor | None = None  # their threads, made with the sessions
        w = config.warmup
        self.warmup_steps = int(round(w * self.total)) if w < 1 else int(w)

    # ---- setup ----------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {"config": self.config.resume_identity(), "bundle": self.manifest.fingerprint, "data": self.train.sha256,
                "val": self.val.sha256 if self.val else None,
                "start": checksum(self.start.tensors) if self.start else None}

    def _run_threads(self) -> int:
        """Intra-op threads of each train-graph run: --threads shared among --data-parallel runs (0: onnxruntime's default)."""
        if self.parallel == 1:
            return self.config.threads
        return max(1, (self.config.threads or os.cpu_count() or 1) // self.parallel)

    def _sessions(self) -> None:
        """Build the sessions and fit them to the memory budget (probing the train graph if there is one)."""
        c = self.config
        longest = int(min(self.train.lengths.max(), self.manifest.max_length))
        budget = c.memory_budget_mb
        want = min(c.batch_size, c.micro_batch or c.batch_size, -(-c.batch_size // self.parallel))
        threads = self._run_threads()
        lean = SessionConfig(threads=threads, arena=False)
        # concurrent runs share one session (onnxruntime's Run is thread-safe): the frozen weights are held once
        if self.pool is not None:  # sessions built again (--select auto's cut graph)
            self.pool.shutdown()
        if self.parallel > 1:
            allocator.one_malloc_arena()  # else each worker thread keeps a heap of its own (runtime/allocator.py)
        self.pool = ThreadPoolExecutor(self.parallel) if self.parallel > 1 else None
        self.predictor = Predictor(self.bundle, lean if budget else SessionConfig(threads=c.threads)) if self.val else None
        if not budget:
            self.session = self.bundle.session("train", SessionConfig(threads=threads), outputs=self.slots.outputs())
            self.plan = memory.unlimited_plan(want, longest, SessionConfig(threads=threads))
            return
        self.session = self.bundle.session("train", lean, outputs=self.slots.outputs())
        cnn = self.manifest.task in CNN_INPUTS  # one input shape: a capped shared arena is safe (runtime/memory.py)
        # a probe runs --data-parallel micro-batches at once, so the plan's micro-batch is what fits that many times
        self.plan = memory.plan_memory(budget, batch_size=want, longest=longest, measure=self._probe, threads=threads,
                                       sized_arena=cnn)
        if self.plan.session.arena:
            self.session = self.bundle.session("train", self.plan.session, outputs=self.slots.outputs())
        if self.plan.session.arena_cap_mb:
            self._try_capped_arena()

    def _try_capped_arena(self) -> None:
        """Run a whole micro-batch twice under the capped arena; if onnxruntime refuses an allocation, train with arena off.
        Evaluation shares the arena, so what it allocates comes out of memory a train step left free."""
        try:
            for _ in range(2):
                self._probe(self.plan.micro_batch, self.plan.max_length)
        except Fail:  # onnxruntime's refusal of an allocation beyond the cap
            self.plan = memory.without_arena(self.plan)
            self.session = self.bundle.session("train", self.plan.session, outputs=self.slots.outputs())
            return
        if self.val is not None:  # the planned evaluation session replaces the lean one, never beside it (47 MB for
            self.predictor = None  # EfficientNet-Lite0's, its weights dequantized at load: both at once broke the budget)
            self.predictor = Predictor(self.bundle, self.plan.session)

    def _probe(self, b: int, t: int) -> float:
        if self.manifest.task in CNN_INPUTS:  # an image's or a clip's input size does not depend on t
            feeds = {CNN_INPUTS[self.manifest.task]: np.zeros((b, *_cnn_input_shape(self.manifest)), np.float32),
                     LABELS: np.zeros(b, np.int64), **self.params}
            return memory.peak_during(lambda: self._run_all([feeds] * self.parallel))
        ids = np.full((b, t), max(self.manifest.pad_token_id + 1, 4) % self.manifest.vocab_size, np.int64)
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: np.ones((b, t), np.int64), **self.params}
        if self.manifest.task == SEQ_CLS:
            feeds[LABELS] = np.zeros(b, np.int64)
        elif self.manifest.task == TOKEN_CLS:
            feeds[LABELS] = np.zeros((b, t), np.int64)
        else:
            feeds.update(train_feeds(feeds, loss_chunks(self.session), first_target(self.manifest)))
        return memory.peak_during(lambda: self._run_all([feeds] * self.parallel))

    def _run_all(self, feeds: list[dict[str, np.ndarray]], outputs: list[str] | None = None) -> list[list[np.ndarray]]:
        """Each feed through the train graph, up to --data-parallel of them at once; results in the feeds' order."""
        if self.pool is None or len(feeds) == 1:
            return [self.session.run(outputs, f) for f in feeds]
        return list(self.pool.map(lambda f: self.session.run(outputs, f), feeds))

    def _fresh_delta(self) -> Delta:
        """The starting delta at the bundle's rank (a lower-rank one zero-padded: the padding stays zero)."""
        if self.start is not None:
            d = Delta({k: np.array(v, np.float32) for k, v in self.start.tensors.items()}, self.start.meta)
        else:  # a fresh rank-r delta is the first r factors of the bundle's fresh init (a prompt's text init)
            d = ranks.cut_rank(with_text_init(self.bundle, delta_from_init(self.manifest, self.config.seed)), self.rank, exact=False)
        return ranks.pad_rank(d, self.full_rank)

    # ---- one optimizer step ---------------------------------------------------------------------

    def _weight(self, b: dict[str, np.ndarray]) -> int:
        # the graph's loss is a mean over examples (classification), labelled tokens (token classification)
        # or real target tokens (LM)
        if LABELS in b:
            return int((b[LABELS] != IGNORED_LABEL).sum()) if b[LABELS].ndim == 2 else len(b[LABELS])
        return scored(b[LOSS_MASK], first_target(self.manifest))

    def _split(self, index: np.ndarray) -> list[np.ndarray]:
        """One batch as train-graph runs: by example count, or by padded tokens under a memory budget."""
        if self.plan.max_tokens:
            return split_by_tokens(index, np.minimum(self.train.lengths, self.plan.max_length), self.plan.max_tokens)
        return split_batch(index, min(self.plan.micro_batch, -(-len(index) // self.parallel)))

    def _grads(self, group: list[np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradients of a group of batches (micro-batched)."""
        names = self.slots.trained  # a pruned graph has no held gradients
        outputs = [LOSS] + [grad_name(n) for n in names]
        micro = [self.train.batch(mb, self.plan.max_length) for idx in group for mb in self._split(idx)]
        weights = [self._weight(b) for b in micro]
        total_w = max(1, sum(weights))  # a batch whose labelled words were all truncated away weighs 0
        loss, grads = 0.0, None
        chunks = loss_chunks(self.session)
        shared = {**self.params, **self._shifted()}
        # a causal LM scores only its target tokens
        feeds = [{**(b if LABELS in b else train_feeds(b, chunks, first_target(self.manifest))), **shared} for b in micro]
        p = self.parallel  # p runs at a time: memory holds p micro-batches' activations, not all of them
        outs = (out for i in range(0, len(feeds), p) for out in self._run_all(feeds[i:i + p], outputs))
        for out, w in zip(outs, weights):
            f = w / total_w  # 1.0 without accumulation: the gradients are used exactly as the graph gave them
            loss += f * float(out[0])
            scaled = [g if f == 1.0 else g * np.float32(f) for g in out[1:]]
            grads = scaled if grads is None else [a + g for a, g in zip(grads, scaled)]
        return loss, self.slots.with_zeros(dict(zip(names, grads)), self.params)

    def _shifted(self) -> dict[str, np.ndarray]:
        """The head bias as the train graph sees it under --logit-adjust (the optimizer keeps the unshifted one)."""
        return {k: self.params[k] + v for k, v in self.shift.items()}

    def _step(self, group: list[np.ndarray], lr: float) -> float:
        """Loss and gradients of a group of batches, clipped, then one AdamW update (held slots stay neutral)."""
        loss, gd = self._grads(group)
        if not math.isfinite(loss):
            raise TrainError(f"the training loss became {loss} at step {self.step + 1}; lower --lr")
        if self.config.max_grad_norm:
            clip_by_global_norm(gd, self.config.max_grad_norm)
        self.optimizer.step(gd, lr)
        for h in self.hooks:  # after the update, with this step's (clipped) gradients: PEFT's update_and_allocate(step)
            h.after_step(self.params, gd, self.step)
        self.slots.hold(self.params)
        return loss

    def _select(self) -> None:
        """--select auto: probe the starting delta's gradients, choose modules, hold the rest at their neutral value."""
        c = self.config
        if c.select != "auto":
            return
        self.selection = probe_selection(self.manifest.slots, lambda idx: self._grads([idx])[1], self.train.lengths,
                                         c.batch_size, c.seed, c.max_delta_bytes)
        self.slots = HeldSlots.holding(self.manifest.slots, self.selection)
        self.slots.hold(self.params)
        self.session = self.predictor = None  # freed before the cut graph loads: the plan below measures it alone
        self._sessions()  # the graph cut to the trained gradients (edgepeft/onnx_prune.py), its memory planned again

    # ---- state ----------------------------------------------------------------------------------

    def _save(self, done: bool = False) -> None:
        if self.checkpoint_dir is None:
            return
        arrays, scalars = self.optimizer.state()
        arrays = {**arrays, **{f"delta.{k}": v for k, v in self.params.items()}}
        if self.best is not None:
            arrays.update({f"best.{k}": v for k, v in self.best["tensors"].items()})
        for i, h in enumerate(self.hooks):
            arrays.update({f"hook{i}.{k}": v for k, v in h.state().items()})
        state = {
            "identity": self._identity(), "optimizer": scalars, "step": self.step, "epoch": self.epoch,
            "position": self.position, "epoch_rng": self.epoch_rng, "samples": self.samples,
            "best": None if self.best is None else {k: v for k, v in self.best.items() if k != "tensors"},
            "bad_evals": self.bad_evals, "stopped": self.stopped, "before": self.before, "losses": self.losses,
            "last_eval_step": self.last_eval_step, "done": done, "saved": now_iso(),
        }
        ckpt.save_checkpoint(self.checkpoint_dir, arrays, state)

    def _restore(self) -> None:
        arrays, s = ckpt.load_checkpoint(self.checkpoint_dir)
        mine, theirs = self._identity(), s.get("identity", {})
        for key in mine:
            a, b = mine[key], theirs.get(key)
            if key == "config" and isinstance(b, dict):
                diff = sorted(k for k in a if a[k] != b.get(k))
                if diff:
                    k = diff[0]
                    raise TrainError(f"{self.checkpoint_dir}: the checkpoint was made with {k.replace('_', '-')}={b.get(k)!r}, "
                                     f"this run asks {a[k]!r}; use the same options or drop --resume")
            elif a != b:
                raise TrainError(f"{self.checkpoint_dir}: the checkpoint was made with different {key} "
                                 "(bundle, data file or starting delta); use the same inputs or drop --resume")
        for k in self.params:
            a = arrays.get(f"delta.{k}")
            if a is None or a.shape != self.params[k].shape:
                raise TrainError(f"{self.checkpoint_dir}: checkpoint lacks or misshapes delta slot {k}")
            self.params[k][...] = a
        self.optimizer.load_state(arrays, s["optimizer"])
        for i, h in enumerate(self.hooks):
            h.load({k[len(f"hook{i}."):]: v for k, v in arrays.items() if k.startswith(f"hook{i}.")})
        self.step, self.epoch, self.position = s["step"], s["epoch"], s["position"]
        self.epoch_rng, self.samples, self.bad_evals = s["epoch_rng"], s["samples"], s["bad_evals"]
        self.stopped, self.before, self.losses = s["stopped"], s["before"], list(s["losses"])
        self.last_eval_step = s["last_eval_step"]
        self.best = None
        if s["best"] is not None:
            self.best = {**s["best"], "tensors": {k: np.array(arrays[f"best.{k}"]) for k in self.params}}

    # ---- evaluation -----------------------------------------------------------------------------

    def _evaluate(self, tensors: dict[str, np.ndarray] | None = None) -> dict[str, float] | None:
        if self.predictor is None:
            return None
        delta = Delta(self.params if tensors is None else tensors, self.delta.meta)
        return evaluate(self.predictor, self.val, [delta], batch_size=self.plan.micro_batch, max_length=self.plan.max_length)

    def _after_eval(self, metrics: dict[str, float]) -> None:
        """Keep the best delta so far; count evaluations without improvement for early stopping."""
        if self.best is None or score(metrics) > score(self.best["metrics"]):
            self.best = {"metrics": metrics, "step": self.step, "samples": self.samples,
                         "tensors": {k: v.copy() for k, v in self.params.items()}}
            self.bad_evals = 0
        else:
            self.bad_evals += 1
            if self.config.patience and self.bad_evals >= self.config.patience:
                self.stopped = True
        self.last_eval_step = self.step
        self._report(metrics)

    def _report(self, metrics: dict[str, float] | None = None) -> None:
        elapsed = time.perf_counter() - self.t0
        done = self.step - self.first_step
        rate = done / elapsed if elapsed > 0 and done else 0.0
        self.on_progress(Progress(self.step, self.total, self.epoch, self.losses[-1] if self.losses else float("nan"),
                                  self.lr, rate, (self.total - self.step) / rate if rate else float("nan"), metrics))

    # ---- the loop -------------------------------------------------------------------------------

    def fit(self, *, resume: bool = False) -> TrainResult:
        """Train (or continue the checkpointed run when ``resume``) and return the best delta with a summary."""
        c = self.config
        if self.checkpoint_dir is not None and ckpt.has_checkpoint(self.checkpoint_dir) and not resume:
            raise TrainError(f"{self.checkpoint_dir} already holds a checkpoint; pass --resume to continue it "
                             "or choose another --checkpoint-dir")
        self.delta = self._fresh_delta()
        self.params = self.delta.tensors
        self.optimizer = c.make_optimizer(self.params)
        self.selection, self.slots = None, HeldSlots(self.manifest.slots)
        self._sessions()
        self._select()
        rng = np.random.default_rng(c.seed)
        self.step = self.epoch = self.position = self.samples = self.bad_evals = 0
        self.epoch_rng: dict = rng.bit_generator.state
        self.best, self.stopped, self.losses, self.lr, self.last_eval_step = None, False, [], 0.0, -1
        resumed_at = None
        if resume and self.checkpoint_dir is not None and ckpt.has_checkpoint(self.checkpoint_dir):
            self._restore()
            resumed_at = self.step
        else:
            self.before = self._evaluate()
            if self.before is not None:  # the starting point competes for best: a run never returns something worse
                self.best = {"metrics": self.before, "step": self.step, "samples": 0,
                             "tensors": {k: v.copy() for k, v in self.params.items()}}
        self.first_step, self.t0 = self.step, time.perf_counter()
        if resumed_at is None and self.before is not None:
            self._report(self.before)
        lengths = self.train.lengths

        while self.step < self.total and not self.stopped:
            rng.bit_generator.state = self.epoch_rng  # the epoch's order is replayed from its starting state
            batches = plan_batches(lengths, c.batch_size, rng, labels=self.train.labels if c.balance_labels else None)
            next_epoch_rng = rng.bit_generator.state
            while self.step < self.total and not self.stopped:
                group = batches[self.position:self.position + c.grad_accum]
                self.lr = lr_at(self.step, base_lr=c.lr, total=self.total, warmup=self.warmup_steps, schedule=c.schedule)
                self.losses = (self.losses + [self._step(group, self.lr)])[-20:]
                self.step += 1
                self.position += len(group)
                self.samples += sum(len(g) for g in group)
                epoch_end = self.position >= len(batches)
                self._report()
                if epoch_end:  # roll over before any checkpoint, so a checkpoint never sits on an epoch boundary
                    self.epoch, self.position, self.epoch_rng = self.epoch + 1, 0, next_epoch_rng
                if self.predictor is not None and (self.step % c.eval_every == 0 if c.eval_every else epoch_end):
                    self._after_eval(self._evaluate())
                if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self._save()
                if epoch_end:
                    break
        if self.predictor is not None and self.last_eval_step != self.step:
            self._after_eval(self._evaluate())  # the final delta competes for best too
        self._save(done=True)
        return self._result(resumed_at)

    def _result(self, resumed_at: int | None) -> TrainResult:
        seconds = time.perf_counter() - self.t0
        tensors, samples, after, best_step = self.params, self.samples, None, None
        if self.best is not None:
            tensors, samples = self.best["tensors"], self.best["samples"]
            after, best_step = self.best["metrics"], self.best["step"]
        start = self.start
        meta = dataclasses.replace(
            self.delta.meta, adapter=self.config.adapter or (start.meta.adapter if start else "default"), version=0,
            parent=start.meta.version if start else None, samples=int(samples), creator=self.config.creator,
            created=now_iso(), extra=self._extra(after))
        steps_done = self.step - self.first_step
        summary = TrainSummary(
            steps=self.step, total_steps=self.total, epochs_done=self.epoch, samples=self.samples, seconds=seconds,
            steps_per_s=steps_done / seconds if seconds > 0 else 0.0, peak_rss_mb=memory.peak_rss_mb(),
            train_loss=float(np.mean(self.losses)) if self.losses else float("nan"), before=self.before, after=after,
            best_step=best_step, stopped_early=self.stopped, resumed_at=resumed_at, memory=self.plan,
            selection=self.selection.describe() if self.selection else None)
        tensors = {k: np.array(v, np.float32) for k, v in tensors.items()}
        for h in self.hooks:  # the delta that travels (AdaLoRA: only the surviving ranks), and what the hook decided
            tensors = h.finish(tensors)
            meta.extra.update(h.describe())
        if self.selection is not None:
            meta.extra.update(self.selection.metadata())
        out = Delta(tensors, meta)
        return TrainResult(ranks.cut_rank(out, self.rank), summary)

    def _extra(self, after: dict[str, float] | None) -> dict[str, str]:
        extra = {"steps": str(self.step), "train_loss": f"{np.mean(self.losses):.6g}" if self.losses else "nan"}
        for k, v in (after or {}).items():
            if k != "examples":
                extra[f"val_{k}"] = f"{v:.6g}"
        return extra
