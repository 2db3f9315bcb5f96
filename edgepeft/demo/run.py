"""The main job, end to end: export a real model once, start a local hub, let three device agents train on
their own new data, push, aggregate, pull, and print held-out accuracy at every stage.

The task (edgepeft/demo/task.py) brings the model and the data: text (all-MiniLM-L6-v2 on Rotten Tomatoes),
images (EfficientNet-Lite0 on Fashion-MNIST) or speech (a keyword spotter meeting new voices). Everything else
is real and the same for all three: the hub as its own process on loopback (SQLite store), the device agents
of ``edgepeft.devices`` with the numpy + onnxruntime trainer.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgepeft.demo.task import DemoTask
from edgepeft.hub.local import bundle_tar, free_port, start_hub

FLEET = "demo"


@dataclass
class DemoConfig:
    """Knobs of the demo; None takes the task's default (each task's defaults finish in a few minutes on two cores)."""

    workdir: Path = Path("edgepeft-demo")
    devices: int = 3
    rounds: int = 2
    per_device: int | None = None  # new examples each device sees per round
    eval_rows: int | None = None  # held-out examples every stage is scored on
    epochs: int | None = None
    port: int = 0  # 0: pick a free port
    train: dict = field(default_factory=dict)  # TrainConfig options over the task's

    def resolved(self, task: DemoTask) -> "DemoConfig":
        """This config with the task's defaults filled in."""
        pick = lambda k: getattr(self, k) if getattr(self, k) is not None else task.defaults[k]  # noqa: E731
        return dataclasses.replace(self, per_device=pick("per_device"), eval_rows=pick("eval_rows"), epochs=pick("epochs"),
                                   train={**task.defaults["train"], **self.train})


def make_task(name: str) -> DemoTask:
    """The demo task called ``name`` (text, images or speech)."""
    if name == "images":
        from edgepeft.demo.images import ImageTask

        return ImageTask()
    if name == "speech":
        from edgepeft.demo.speech import SpeechTask

        return SpeechTask()
    from edgepeft.demo.text import TextTask

    return TextTask()


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print, task: DemoTask | None = None) -> dict:
    """Run the whole loop for ``task`` (default: text); return the accuracy of every stage."""
    from edgepeft.delta import load_delta
    from edgepeft.devices.agent import Agent, AgentConfig, runtime_train_fn
    from edgepeft.devices.client import HubClient
    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.infer import Predictor

    task = task or make_task("text")
    cfg = cfg.resolved(task)
    work = cfg.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    bundle_dir = work / task.bundle_name
    if not (bundle_dir / "manifest.json").is_file():
        task.export(bundle_dir, say)
    bundle = open_bundle(bundle_dir)
    predictor = Predictor(bundle)
    accuracy = lambda deltas=(): task.accuracy(predictor, deltas)  # noqa: E731
    held = task.held_out(bundle, cfg.eval_rows, work)

    results: dict = {"task": task.name, "held_out": cfg.eval_rows, "stages": []}

    def stage(name: str, acc: float) -> None:
        results["stages"].append({"stage": name, "accuracy": round(acc, 4)})
        say(f"   {name:<44} held-out accuracy {100 * acc:5.1f} %")

    say(f"== base model, no delta ({held})")
    stage(task.base_stage, accuracy())

    hub_dir = work / "hub"
    shutil.rmtree(hub_dir, ignore_errors=True)
    port = cfg.port or free_port()
    url = f"http://127.0.0.1:{port}"
    say(f"== hub: {url} (SQLite store in {hub_dir})")
    hub = start_hub(hub_dir, port, work / "hub.log")
    try:
        admin = HubClient(url, (hub_dir / "admin.token").read_text().strip(), retries=2)
        tar = bundle_tar(bundle_dir)
        fp = admin.request("POST", "/api/v1/bundles", content=tar).json()["fingerprint"]
        admin.request("POST", "/api/v1/fleets", json={"name": FLEET, "bundle": fp, "staleness": cfg.rounds})
        agents = []
        for i in range(cfg.devices):
            name = f"device-{i + 1}"
            token = admin.request("POST", f"/api/v1/fleets/{FLEET}/devices", json={"device": name}).json()["token"]
            home = work / name
            shutil.rmtree(home, ignore_errors=True)
            (home / "data").mkdir(parents=True)
            trained: dict = {}
            base_fn = runtime_train_fn({**cfg.train, "epochs": cfg.epochs, "creator": name})

            def train_fn(bundle_path, data, start, out, _fn=base_fn, _box=trained):
                n = _fn(bundle_path, data, start, out)
                _box["delta"] = out.read_bytes()
                return n

            acfg = AgentConfig(hub=url, token=token, bundle=str(bundle_dir), data_dir=str(home / "data"),
                               state_dir=str(home / "state"), retries=3, backoff_s=0.2)
            agents.append((name, Agent(acfg, train_fn=train_fn), trained, home))
        say(f"   fleet {FLEET!r}: {cfg.devices} devices{task.devices_note(cfg.devices)}, bundle {fp[:12]}")

        results["wire"] = []
        for r in range(cfg.rounds):
            up = down = 0
            say(f"== round {r + 1}: each device trains on {cfg.per_device} new {task.unit} of its own, then pushes")
            for i, (name, agent, trained, home) in enumerate(agents):
                task.write_shard(home / "data", r, i, cfg.devices, cfg.per_device)
                t0 = time.perf_counter()
                rep = agent.run_once()
                up, down = up + rep.bytes_up, down + rep.bytes_down
                tmp = home / "state" / "last.delta"
                tmp.write_bytes(trained["delta"])
                acc = accuracy([load_delta(tmp, bundle.manifest)])
                parent = f"from v{rep.version}" if rep.version else "from scratch"
                stage(f"round {r + 1} {name} ({parent}, {time.perf_counter() - t0:.0f} s)", acc)
            v = admin.request("POST", f"/api/v1/fleets/{FLEET}/adapters/default/aggregate", json=None).json()
            rep = v.get("report", {})
            say(f"== hub: aggregated {rep.get('count')} deltas ({rep.get('samples')} samples) into version {v['version']}")
            for name, agent, _, home in agents:
                rep = agent.run_once()  # pulls the new version (nothing new to train)
                up, down = up + rep.bytes_up, down + rep.bytes_down
            n = len(agents)
            results["wire"].append({"round": r + 1, "up_bytes_per_device": up / n, "down_bytes_per_device": down / n})
            say(f"== wire, round {r + 1}: {up / n / 1024:.1f} KB up and {down / n / 1024:.1f} KB down per device "
                f"(packed int8 + zstd; sha256 of every pull checked)")
            versions = {agent.version for _, agent, _, _ in agents}
            pulled = agents[0][1].adapter_path
            stage(f"round {r + 1} fleet version v{v['version']} (pulled by all: {versions == {v['version']}})",
                  accuracy([load_delta(pulled, bundle.manifest)]))
        results["status_page"] = f"{url}/?token=... (admin token in {hub_dir / 'admin.token'})"
    finally:
        hub.terminate()
        try:
            hub.wait(timeout=10)
        except subprocess.TimeoutExpired:
            hub.kill()
    base, final = results["stages"][0]["accuracy"], results["stages"][-1]["accuracy"]
    say(f"== done: held-out accuracy {100 * base:.1f} % (base) -> {100 * final:.1f} % (fleet adapter); "
        f"only deltas travelled ({_delta_kb(agents[0][1].adapter_path)} KB as float32, packed on the wire)")
    return results


def _delta_kb(path: Path) -> str:
    return f"{path.stat().st_size / 1024:.0f}" if path.is_file() else "?"


if __name__ == "__main__":  # python -m edgepeft.demo.run
    run_demo(DemoConfig(workdir=Path(os.environ.get("EDGEPEFT_DEMO_DIR", "edgepeft-demo"))),
             task=make_task(os.environ.get("EDGEPEFT_DEMO_TASK", "text")))
