"""``edgepeft train`` and ``edgepeft eval``: the device loop from the command line (numpy + onnxruntime only).

Everything is checked before the first step; the output delta is written atomically at the end, so
a failing run leaves any earlier output or checkpoint as it was. Errors are EdgePeftErrors: the
CLI edge prints them as one line.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import click

from edgepeft.delta import load_delta, save_delta
from edgepeft.errors import TrainError
from edgepeft.names import IMAGE_CLS
from edgepeft.runtime.bundle import SessionConfig, open_bundle
from edgepeft.runtime.datasets import load_for_bundle
from edgepeft.runtime.images import Augment
from edgepeft.runtime.evaluate import describe, evaluate
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.trainer import Progress, TrainConfig, Trainer, TrainSummary

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _opt(*decls: str, field: str, type: object = None, **kw: object):  # noqa: A002
    """A click option whose default and help come from the TrainConfig field of the same name."""
    f = _FIELDS[field]
    return click.option(*decls, field, type=type or f.type, default=f.default, show_default=True,
                        help=f.metadata["help"], **kw)


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _ProgressLine:
    """A one-line progress display on stderr (rewritten with \\r); evaluations get their own line."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = 0

    def __call__(self, p: Progress) -> None:
        if self.quiet:
            return
        if p.metrics is not None:
            click.echo(("\r" if self.tty else "") + f"step {p.step}/{p.total}  validation {describe(p.metrics)}" + " " * 10, err=True)
            return
        line = (f"step {p.step}/{p.total}  epoch {p.epoch + 1}  loss {p.loss:.4f}  lr {p.lr:.2e}  "
                f"{p.steps_per_s:.2f} steps/s  left {_duration(p.eta_s)}")
        if self.tty:
            click.echo("\r" + line, err=True, nl=p.step == p.total)
        elif p.step == p.total or p.step - self.last >= max(1, p.total // 20):  # a log file gets ~20 lines
            click.echo(line, err=True)
            self.last = p.step


def _summary(s: TrainSummary, out: Path) -> str:
    lines = [s.selection] if s.selection else []
    lines += [f"trained {s.steps} steps ({s.samples} examples seen) in {s.seconds:.1f} s, {s.steps_per_s:.2f} steps/s"
             + (f" (resumed at step {s.resumed_at})" if s.resumed_at is not None else "")]
    if s.before is not None:
        lines.append(f"validation before: {describe(s.before)}")
        lines.append(f"validation after:  {describe(s.after)} (best at step {s.best_step})"
                     + (" (stopped early)" if s.stopped_early else ""))
        if s.best_step == 0:
            lines.append("no evaluation beat the starting delta: wrote the starting delta (samples 0), "
                         "try more steps, a higher --lr or more data")
    else:
        lines.append(f"final training loss {s.train_loss:.4f} (no --val data to measure accuracy on)")
    peak = f"peak memory {s.peak_rss_mb:.0f} MB"
    lines.append(peak + (f" ({s.memory.describe()})" if s.memory.budget_mb else ""))
    lines.append(f"wrote {out} ({out.stat().st_size / 1024:.1f} KB)")
    return "\n".join(lines)


@click.command("train")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Training data: .jsonl, .csv (text,label header) or .txt (causal LM); for an image bundle a folder of class folders, an image,label .csv, IDX or .npy images; for an audio bundle a folder of word folders of 16 kHz mono WAV files or an audio,label .csv.")
@click.option("--val", type=click.Path(path_type=Path), default=None, help="Validation data (same formats) for accuracy / perplexity, early stopping and keeping the best delta.")
@click.option("--delta", "start", type=click.Path(path_type=Path), default=None, help="Delta to start from (default: a fresh one).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Delta file to write (atomically, at the end).")
@_opt("--epochs", field="epochs", type=click.IntRange(min=1))
@_opt("--max-steps", field="max_steps", type=click.IntRange(min=0))
@_opt("--batch-size", field="batch_size", type=click.IntRange(min=1))
@_opt("--lr", field="lr", type=click.FloatRange(min=0, min_open=True))
@_opt("--weight-decay", field="weight_decay", type=click.FloatRange(min=0))
@_opt("--optimizer", field="optimizer", type=click.Choice(["adamw", "sgd"]))
@_opt("--momentum", field="momentum", type=click.FloatRange(min=0, max=1, max_open=True))
@_opt("--adam-eps", field="adam_eps", type=click.FloatRange(min=0, min_open=True))
@_opt("--prox", field="prox", type=click.FloatRange(min=0))
@_opt("--warmup", field="warmup", type=click.FloatRange(min=0))
@_opt("--schedule", field="schedule", type=click.Choice(["linear", "cosine", "constant"]))
@_opt("--grad-accum", field="grad_accum", type=click.IntRange(min=1))
@_opt("--micro-batch", field="micro_batch", type=click.IntRange(min=0))
@_opt("--max-grad-norm", field="max_grad_norm", type=click.FloatRange(min=0))
@_opt("--seed", field="seed", type=int)
@_opt("--balance-labels", field="balance_labels", type=bool, is_flag=True)
@_opt("--logit-adjust", field="logit_adjust", type=click.FloatRange(min=0))
@_opt("--rank", field="rank", type=click.IntRange(min=0))
@_opt("--eval-every", field="eval_every", type=click.IntRange(min=0))
@_opt("--patience", field="patience", type=click.IntRange(min=0))
@click.option("--checkpoint-dir", type=click.Path(path_type=Path, file_okay=False), default=None, help="Folder for the checkpoint (deltas, optimizer, data position); none if not given.")
@_opt("--checkpoint-every", field="checkpoint_every", type=click.IntRange(min=0))
@click.option("--resume", is_flag=True, help="Continue the run checkpointed in --checkpoint-dir (starts fresh if it holds none).")
@_opt("--memory-budget", field="memory_budget_mb", type=click.FloatRange(min=0))
@_opt("--threads", field="threads", type=click.IntRange(min=0))
@_opt("--data-parallel", field="data_parallel", type=click.IntRange(min=0))
@_opt("--adapter", field="adapter", type=str)
@_opt("--creator", field="creator", type=str)
@_opt("--select", field="select", type=click.Choice(["all", "auto"]))
@_opt("--max-delta-bytes", field="max_delta_bytes", type=click.IntRange(min=0))
@click.option("--crop-pad", type=click.IntRange(min=0), default=0, show_default=True, help="Images: random crops after padding each side by this many pixels (0: none).")
@click.option("--flip", is_flag=True, help="Images: random horizontal flips.")
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
def train_cmd(bundle: Path, data: Path, val: Path | None, start: Path | None, out: Path, checkpoint_dir: Path | None,
              resume: bool, crop_pad: int, flip: bool, quiet: bool, **options: object) -> None:
    """Train a delta for BUNDLE on local data, with numpy + onnxruntime only."""
    if resume and checkpoint_dir is None:
        raise click.UsageError("--resume needs --checkpoint-dir")
    if out.is_dir():
        raise TrainError(f"{out}: is a directory; -o names the delta file to write")
    config = TrainConfig(**options)
    b = open_bundle(bundle)
    augment = Augment(crop_pad, flip) if crop_pad or flip else None
    if (crop_pad or flip) and b.manifest.task != IMAGE_CLS:
        raise TrainError("--crop-pad and --flip augment images; this bundle is a " + b.manifest.task + " bundle")
    train = load_for_bundle(data, b, augment, config.seed)
    val_ds = load_for_bundle(val, b) if val is not None else None
    start_delta = load_delta(start, b.manifest, for_training=True) if start is not None else None
    trainer = Trainer(b, train, config, val=val_ds, start=start_delta, checkpoint_dir=checkpoint_dir,
                      on_progress=_ProgressLine(quiet))
    result = trainer.fit(resume=resume)
    save_delta(out, result.delta)
    click.echo(_summary(result.summary, out))


@click.command("eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Data to evaluate on: .jsonl, .csv or .txt (causal LM).")
@click.option("--delta", "delta_path", type=click.Path(path_type=Path), default=None, help="Delta to apply (default: the base model alone).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Examples per inference run.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="onnxruntime intra-op threads (0: all cores).")
def eval_cmd(bundle: Path, data: Path, delta_path: Path | None, batch_size: int, threads: int) -> None:
    """Print the metrics of BUNDLE (+ a delta) on a data file: accuracy (token classification: and F1), or loss and perplexity."""
    b = open_bundle(bundle)
    ds = load_for_bundle(data, b)
    deltas = [load_delta(delta_path, b.manifest)] if delta_path is not None else []
    metrics = evaluate(Predictor(b, SessionConfig(threads=threads)), ds, deltas, batch_size=batch_size)
    for k, v in metrics.items():
        click.echo(f"{k:<11} {int(v) if k in ('examples', 'tokens') else round(v, 6)}")
