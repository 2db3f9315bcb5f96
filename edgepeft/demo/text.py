"""``edgepeft demo --task text``: all-MiniLM-L6-v2 on Rotten Tomatoes snippets, each device with its own shard."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from edgepeft.demo.assets import minilm_dir, rotten_tomatoes_split, write_jsonl
from edgepeft.demo.task import DemoTask, Say


class TextTask(DemoTask):
    name, bundle_name, unit = "text", "minilm-int8.bundle", "snippets"
    base_stage = "base (fresh head, no training)"
    defaults = {"per_device": 800, "eval_rows": 600, "epochs": 2, "train": {"batch_size": 16, "lr": 2e-3, "warmup": 0.1}}

    def __init__(self) -> None:
        self.split = rotten_tomatoes_split(seed=0)
        self.held: list[tuple[str, str]] = []

    def export(self, out: Path, say: Say) -> None:
        from edgepeft.exporters.export import export_bundle  # workstation side, only when the bundle is missing

        say("== workstation: export all-MiniLM-L6-v2 (int8, LoRA r=8 on query/value of the top 2 layers + BitFit + head)")
        export_bundle(minilm_dir(), out, quantize="int8", method="lora+bitfit", labels=["rotten", "fresh"],
                      max_length=64, progress=lambda m: say("   " + m))

    def held_out(self, bundle, rows: int, work: Path) -> str:
        self.held = self.split["test"][:rows]
        majority = max(sum(label == c for _, label in self.held) for c in ("fresh", "rotten")) / len(self.held)
        return f"{len(self.held)} held-out snippets, majority class {100 * majority:.1f} %"

    def accuracy(self, predictor, deltas: Sequence = ()) -> float:
        preds = predictor.classify([t for t, _ in self.held], deltas)
        return sum(p.label == label for p, (_, label) in zip(preds, self.held)) / len(self.held)

    def write_shard(self, data_dir: Path, round_: int, device: int, devices: int, n: int) -> Path:
        lo = (round_ * devices + device) * n
        return write_jsonl(data_dir / f"round{round_ + 1}.jsonl", self.split["train"][lo: lo + n])
