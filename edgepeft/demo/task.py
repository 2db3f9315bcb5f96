"""What a demo task gives the demo's loop (edgepeft/demo/run.py): its bundle, a held-out set, each device's new data.

The loop (hub, agents, rounds, aggregation, pulls) is the same for text, images and speech; a task only knows
its model and its data. Each device's data arrives as one new file in the agent's data folder, in the format
``edgepeft train --data`` reads for that bundle, so the agents are the ones a real device runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Sequence

Say = Callable[[str], None]


class DemoTask(ABC):
    """One ``edgepeft demo --task NAME``: a bundle exported once into the work folder, data for every stage."""

    name: str  # the --task value
    bundle_name: str  # the bundle's folder under the work folder (a bundle found there is reused)
    unit: str  # what one training example is called in the output ("snippets", "images", "clips")
    base_stage: str  # the first stage's name (the base model, no delta)
    defaults: dict  # per_device, eval_rows, epochs and train (TrainConfig options) when the command line leaves them

    @abstractmethod
    def export(self, out: Path, say: Say) -> None:
        """Export the task's bundle to ``out`` (workstation side: called only when the bundle is missing)."""

    @abstractmethod
    def held_out(self, bundle, rows: int, work: Path) -> str:
        """Prepare ``rows`` held-out examples every stage is scored on (files, if any, under ``work``); returns the
        line that describes them."""

    @abstractmethod
    def accuracy(self, predictor, deltas: Sequence = ()) -> float:
        """Held-out accuracy of the bundle with ``deltas`` (none: the base model)."""

    @abstractmethod
    def write_shard(self, data_dir: Path, round_: int, device: int, devices: int, n: int) -> Path:
        """Write device ``device``'s ``n`` new examples of round ``round_`` (both from 0, of ``devices``) into
        ``data_dir``, none seen before by any device; returns the data file."""

    def devices_note(self, devices: int) -> str:
        """Anything the fleet line should say about the devices (a speech device's voice)."""
        return ""
