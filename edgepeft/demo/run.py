"""The main job, end to end: export all-MiniLM-L6-v2, start a local hub, let three device agents train
on their own shards of Rotten Tomatoes, push, aggregate, pull, and print held-out accuracy at every stage.

Everything is real: the model and data from packages, the hub as its own process on loopback (SQLite
store), the device agents of ``edgepeft.devices`` with the numpy + onnxruntime trainer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgepeft.demo.assets import minilm_dir, rotten_tomatoes_split, write_jsonl
from edgepeft.hub.local import bundle_tar, free_port, start_hub

FLEET = "demo"


@dataclass
class DemoConfig:
    """Knobs of the demo; the defaults finish in a few minutes on two cores."""

    workdir: Path = Path("edgepeft-demo")
    devices: int = 3
    rounds: int = 2
    per_device: int = 800  # new snippets each device sees per round
    eval_rows: int = 600  # held-out snippets every stage is scored on
    epochs: int = 2
    port: int = 0  # 0: pick a free port
    train: dict = field(default_factory=lambda: {"batch_size": 16, "lr": 2e-3, "warmup": 0.1})


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> dict:
    """Run the whole loop; return the accuracy of every stage."""
    from edgepeft.delta import load_delta
    from edgepeft.devices.agent import Agent, AgentConfig, runtime_train_fn
    from edgepeft.devices.client import HubClient
    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.infer import Predictor

    work = cfg.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    bundle_dir = work / "minilm-int8.bundle"
    if not (bundle_dir / "manifest.json").is_file():
        from edgepeft.exporters.export import export_bundle  # workstation side, only when the bundle is missing

        say("== workstation: export all-MiniLM-L6-v2 (int8, LoRA r=8 on query/value of the top 2 layers + BitFit + head)")
        export_bundle(minilm_dir(), bundle_dir, quantize="int8", method="lora+bitfit", labels=["rotten", "fresh"],
                      max_length=64, progress=lambda m: say("   " + m))
    bundle = open_bundle(bundle_dir)
    split = rotten_tomatoes_split(seed=0)
    held = split["test"][: cfg.eval_rows]
    predictor = Predictor(bundle)

    def accuracy(deltas=()) -> float:
        preds = predictor.classify([t for t, _ in held], deltas)
        return sum(p.label == l for p, (_, l) in zip(preds, held)) / len(held)

    results: dict = {"held_out": len(held), "stages": []}

    def stage(name: str, acc: float) -> None:
        results["stages"].append({"stage": name, "accuracy": round(acc, 4)})
        say(f"   {name:<44} held-out accuracy {100 * acc:5.1f} %")

    say(f"== base model, no delta ({len(held)} held-out snippets, majority class "
        f"{100 * max(sum(l == c for _, l in held) for c in ('fresh', 'rotten')) / len(held):.1f} %)")
    stage("base (fresh head, no training)", accuracy())

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
        say(f"   fleet {FLEET!r}: {cfg.devices} devices, bundle {fp[:12]}")

        train_rows = split["train"]
        results["wire"] = []
        for r in range(cfg.rounds):
            up = down = 0
            say(f"== round {r + 1}: each device trains on {cfg.per_device} new snippets of its own, then pushes")
            for i, (name, agent, trained, home) in enumerate(agents):
                lo = (r * cfg.devices + i) * cfg.per_device
                write_jsonl(home / "data" / f"round{r + 1}.jsonl", train_rows[lo: lo + cfg.per_device])
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
    run_demo(DemoConfig(workdir=Path(os.environ.get("EDGEPEFT_DEMO_DIR", "edgepeft-demo"))))
