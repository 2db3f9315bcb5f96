"""A fleet of 100 devices against a real hub: non-IID Rotten Tomatoes, real training, faults, one malicious device.

    python benchmarks/bench_fleet.py [--devices 100] [--rounds 6] [--per-round 12] [--rows 32] [--out fleet] [--quick]

The hub is ``edgepeft hub serve`` (uvicorn, SQLite store) in its own process on loopback. Every device is
the real sync agent (``devices/agent.py``: on-disk outbox and state, packed pushes, sha256-checked pulls)
training the real MiniLM int8 bundle (LoRA on query/value of the top 2 layers + BitFit + head, exported at
rank 16) with the device trainer; the devices choose rank 4, 8 or 16 in turn (the fleet takes all three).
They run as light tasks: agent objects, four at a time in threads of this process, sharing one
onnxruntime session per graph (a session keeps no state between runs; 100 copies would only cost memory).

Data: the training split is cut into 100 label-skewed shards by a Dirichlet split (α = 0.3 per label).
Each round a sample of ``--per-round`` devices trains (cross-device federated learning; the malicious one
every round): each gets ``--rows`` new rows of its shard (cycling; a smaller shard gives all it has) and trains two
epochs on them at a constant lr.
Faults every round, each on other devices: drops (the hub unreachable for the round: the delta waits in
the outbox and goes up a round late, weighted down for its staleness), restarts (the agent object is
thrown away after training, before pushing, and rebuilt from its state folder), slow devices (push after
the version was aggregated: stale by one), a device offline for 3 rounds (its delta is refused as too stale
and its data retrained), duplicate pushes (the same bytes again: stored once), and one malicious device
that sends its update sign-flipped and scaled by 10 claiming 10,000 samples. The hub runs its defaults
(updates clipped to the median norm, 20 % trimmed mean, sample caps, staleness weights).

Reported: held-out accuracy of each published version (as devices pull it; the first ``--eval-rows`` of the test split),
against centralized training on the union of the rows the devices were given (the trainer's defaults, one pass over the
union; the mean of ``--central-seeds`` seeds); bytes per device per round
it took part in, up and down; faults survived; accepted deltas lost or double-counted (the hub's versions
against every acceptance the devices saw).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import minilm_bundle, result_name, write_result  # noqa: E402

from edgepeft.delta.format import Delta, load_delta, replace_meta, save_delta  # noqa: E402
from edgepeft.delta.transport import unpack  # noqa: E402
from edgepeft.demo.assets import rotten_tomatoes_split, write_jsonl  # noqa: E402
from edgepeft.hub.local import bundle_tar, free_port, start_hub  # noqa: E402
from edgepeft.devices.agent import Agent, AgentConfig, RoundReport  # noqa: E402
from edgepeft.devices.client import HubClient, HubRefused  # noqa: E402
from edgepeft.runtime.bundle import open_bundle  # noqa: E402
from edgepeft.runtime.data import load_dataset  # noqa: E402
from edgepeft.runtime.infer import Predictor  # noqa: E402
from edgepeft.runtime.text import load_tokenizer  # noqa: E402
from edgepeft.runtime.trainer import TrainConfig, Trainer  # noqa: E402

FLEET, RANKS = "bench", (4, 8, 16)
Rows = list[tuple[str, str]]  # (text, label)
# A round is a few steps from a fresh optimizer: a larger lr, held constant (a decay inside 8 steps halves it), and two
# passes over the round's rows. With one pass at 4 steps even one device on IID rows stayed at the majority class.
# Label-balanced draws: without them each label-skewed device taught the fleet its own prior, and the published
# versions swung between predicting all "rotten" and all "fresh" from round to round.
TRAIN = {"epochs": 2, "batch_size": 16, "lr": 1e-2, "schedule": "constant", "balance_labels": True, "threads": 1,
         "checkpoint_every": 0}
CENTRAL = {"epochs": 1, "batch_size": 16, "threads": 2, "checkpoint_every": 0}  # the trainer's defaults (lr 2e-3), one pass


@dataclass(frozen=True)
class Task:
    """What the fleet learns: the bundle, the rows its devices' shards are cut from, held-out rows, the ranks devices
    choose from and how each device trains a round."""

    bundle: Path
    train: Rows
    held: Rows
    ranks: tuple[int, ...] = RANKS
    options: dict | None = None  # TrainConfig fields of a device's round (None: TRAIN)


def minilm_task(eval_rows: int) -> Task:
    """The benchmark's task: MiniLM int8 at rank 16 (top 2 layers + BitFit + head) on Rotten Tomatoes; held out: the
    first ``eval_rows`` of the test split that the training split does not also hold (the corpus repeats 56 snippets;
    4 of the test split's 1,282 are training rows too, none of its first 300)."""
    split = rotten_tomatoes_split(seed=0)
    path = minilm_bundle("int8", "lora+bitfit", top_layers=2, max_length=64, rank=max(RANKS))
    return Task(path, split["train"], held_out(split["test"], split["train"], eval_rows))


def held_out(test: Rows, train: Rows, n: int) -> Rows:
    """The first ``n`` test rows that are not also training rows: a repeated snippet scored as held out measures recall."""
    seen = set(train)
    return [r for r in test if r not in seen][:n]


def dirichlet_shards(rows: Rows, devices: int, alpha: float, seed: int, min_rows: int = 16) -> list[Rows]:
    """Label-skewed shards: each label's rows spread over devices by proportions drawn from Dirichlet(α)."""
    rng = np.random.default_rng(seed)
    shards: list[Rows] = [[] for _ in range(devices)]
    for label in sorted({label for _, label in rows}):
        mine = [r for r in rows if r[1] == label]
        cuts = (np.cumsum(rng.dirichlet([alpha] * devices)) * len(mine)).astype(int)[:-1]
        for i, part in enumerate(np.split(np.array(rng.permutation(len(mine))), cuts)):
            shards[i] += [mine[j] for j in part]
    for small in sorted(range(devices), key=lambda i: len(shards[i])):  # at α = 0.3 some draws are empty: every device
        while len(shards[small]) < min_rows:                            # gets a few rows, taken from the largest shard
            shards[small].append(max(shards, key=len).pop())
    for s in shards:
        rng.shuffle(s)
    return shards


def shared_bundle(path: Path):
    """The bundle opened once, its sessions built once and shared by every simulated device."""
    b = open_bundle(path)
    cache: dict = {}
    plain = b.session

    def session(kind, config=None, *, outputs=None):
        key = (kind, config, None if outputs is None else tuple(outputs))
        if key not in cache:
            cache[key] = plain(kind, config, outputs=outputs) if config is not None else plain(kind, outputs=outputs)
        return cache[key]

    object.__setattr__(b, "session", session)  # the frozen Bundle, one session per (graph, settings) for all devices
    return b


def round_lr(lr: float, version: int, rounds: int) -> float:
    """A device's lr when it trains from fleet version ``version`` (0: none yet): ``lr`` decayed linearly over ``rounds``
    versions to ``lr / rounds``, held there after (a device may train from a later version; the trainer needs lr > 0),
    as the centralized run's linear schedule decays over its steps (``rounds`` 0: constant). Averaged local steps at a
    constant lr leave the version a fixed distance from the fleet's optimum (client drift grows with lr x local steps);
    a decaying lr shrinks that distance round by round."""
    return lr if rounds <= 0 else lr * max(1, rounds - version) / rounds


def train_fn(bundle, options: dict, malicious: bool = False, lr_rounds: int = 0):
    """An agent train_fn on the shared bundle; the malicious one sends -10 × its update, claiming 10,000 samples.
    ``lr_rounds``: the device lr decays over this many versions (``round_lr``; 0: constant)."""
    tok = load_tokenizer(bundle)

    def train(_bundle_dir: Path, data: Path, start: Path | None, out: Path) -> int:
        start_delta = load_delta(start, bundle.manifest, for_training=True) if start else None
        version = (start_delta.meta.version or 0) if start_delta else 0
        config = TrainConfig(**{**options, "lr": round_lr(options["lr"], version, lr_rounds)})
        d = Trainer(bundle, load_dataset(data, bundle.manifest, tok), config, start=start_delta).fit().delta
        if malicious:
            base = start_delta.tensors if start_delta else {k: np.zeros_like(v) for k, v in d.tensors.items()}
            flip = {k: (v if k.endswith("lora_A") else base[k] - 10.0 * (v - base[k])).astype(np.float32) for k, v in d.tensors.items()}
            d = replace_meta(Delta(flip, d.meta), samples=10_000)
        save_delta(out, d)
        return int(d.meta.samples)

    return train


def round_rows(shard: Rows, rnd: int, rows: int, pad: bool = False) -> Rows:
    """The rows a device is given in round ``rnd``: the next ``rows`` of its shard, cycling; a shard of at most ``rows``
    gives all its rows, in an order of the round's (new bytes, so the agent trains on them again, as FedAvg's devices
    train on their local data in every round they take part). Never more rows than the shard holds: a 16-row device
    padded to 128 with copies of its rows trained 8x longer on them and weighed as much as a device with 128 rows of
    its own. ``pad``: that earlier draw (results/fleet.json and fleet_prox.json were made with it)."""
    if not pad and len(shard) <= rows:
        return [shard[i] for i in np.random.default_rng(rnd).permutation(len(shard))]
    lo = (rnd * rows) % max(1, len(shard))
    return (shard * (1 + rows // max(1, len(shard)) + 1))[lo:lo + rows]


class Device:
    """One simulated device: its agent (rebuilt on a restart), shard, rank and what the hub accepted from it."""

    def __init__(self, name: str, token: str, home: Path, url: str, bundle, shard, rank: int, malicious: bool,
                 train: dict, lr_rounds: int = 0) -> None:
        self.name, self.home, self.shard, self.rank, self.malicious = name, home, shard, rank, malicious
        self.cfg = AgentConfig(hub=url, token=token, bundle=str(bundle.path), data_dir=str(home / "data"),
                               state_dir=str(home / "state"), retries=3, backoff_s=0.05, backoff_cap_s=0.5,
                               train={**train, "rank": rank, "creator": name})
        self.fn = train_fn(bundle, self.cfg.train, malicious, lr_rounds)
        self.accepted: list[str] = []
        self.last: bytes | None = None  # the last bytes pushed (a duplicate push resends them)
        self.seen: set[tuple[str, str]] = set()  # every row it was given: the union is what centralized training gets
        self.agents: list[Agent] = []  # every agent object it ran (a restart builds a new one): their bytes add up
        self.refused = 0  # deltas the hub refused (too stale), whose data the agent trains again
        self.agent = self.build()

    def build(self, url: str | None = None) -> Agent:
        cfg = self.cfg if url is None else AgentConfig(**{**self.cfg.__dict__, "hub": url, "retries": 0})
        agent = Agent(cfg, train_fn=self.fn)
        push = agent.client.push

        def recording(data: bytes) -> dict:
            body = push(data)
            self.last = data
            if not body.get("duplicate"):
                self.accepted.append(body["id"])
            return body

        agent.client.push = recording
        self.agents.append(agent)
        return agent

    def restart(self) -> None:
        """A new agent object from the state folder, as a restarted device process would make."""
        self.agent.client.close()
        self.agent = self.build()

    def new_rows(self, rnd: int, rows: int, pad: bool = False) -> None:
        pick = round_rows(self.shard, rnd, rows, pad)
        self.seen.update(pick)
        write_jsonl(self.home / "data" / f"round{rnd:03d}.jsonl", pick)

    def count(self, rep: RoundReport) -> None:
        self.refused += rep.rejected

    def bytes(self) -> tuple[int, int]:
        return sum(a.client.bytes_up for a in self.agents), sum(a.client.bytes_down for a in self.agents)


def fleet_options(args: argparse.Namespace) -> dict:
    """The fleet's aggregation options beyond the hub's defaults: its server step."""
    return {k: v for k, v in {"server_lr": args.server_lr, "server_momentum": args.server_momentum}.items()
            if v is not None}


DEVICE_FLAGS = ("lr", "optimizer", "momentum", "adam_eps", "prox", "weight_decay")  # TrainConfig fields the bench can set


def device_options(train: dict, args: argparse.Namespace) -> dict:
    """A device's round as the command line changes it: lr, optimizer and its options, and logit adjustment in place of
    label-balanced draws."""
    out = {**train, **{k: getattr(args, k) for k in DEVICE_FLAGS if getattr(args, k) is not None}}
    if args.logit_adjust is not None:
        out.update(logit_adjust=args.logit_adjust, balance_labels=args.logit_adjust == 0 and train.get("balance_labels", False))
    return out


def run(args: argparse.Namespace, work: Path, task: Task) -> dict:
    path, held, ranks = task.bundle, task.held, task.ranks
    train = device_options(task.options or TRAIN, args)
    bundle = shared_bundle(path)
    predictor = Predictor(bundle)

    def accuracy(deltas) -> float:
        preds = predictor.classify([t for t, _ in held], deltas)
        return float(np.mean([p.label == l for p, (_, l) in zip(preds, held)]))

    base_accuracy = accuracy([])
    shards = dirichlet_shards(task.train, args.devices, args.alpha, seed=0)
    hub_dir = work / "hub"
    port = int(os.environ.get("BENCH_FLEET_PORT", "0")) or free_port()
    url = f"http://127.0.0.1:{port}"
    hub = start_hub(hub_dir, port, work / "hub.log")
    faults = {"drops": 0, "restarts": 0, "slow": 0, "duplicates_sent": 0, "refused_stale": 0, "malicious_rounds": 0}
    try:
        admin = HubClient(url, (hub_dir / "admin.token").read_text().strip(), retries=2)
        fp = admin.request("POST", "/api/v1/bundles", content=bundle_tar(path)).json()["fingerprint"]
        admin.request("POST", "/api/v1/fleets", json={"name": FLEET, "bundle": fp, "staleness": 2, "ranks": list(ranks),
                                                 "robust": fleet_options(args)})
        devices = []
        for i in range(args.devices):
            name = f"dev{i:03d}"
            token = admin.request("POST", f"/api/v1/fleets/{FLEET}/devices", json={"device": name}).json()["token"]
            (work / name / "data").mkdir(parents=True)
            devices.append(Device(name, token, work / name, url, bundle, shards[i], ranks[i % len(ranks)], i == args.devices - 1,
                                  train, args.lr_rounds))
        rng = np.random.default_rng(1)
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: a dropped connection
        evil, offline = devices[-1], devices[1]  # offline: cut off in round 2, away in rounds 3-5, back in round 6
        rounds, t_start, participations = [], time.perf_counter(), 0
        for r in range(args.rounds):
            t0 = time.perf_counter()
            # a sample of the fleet trains each round (cross-device FL); the malicious device always, the offline one
            # when its script says
            pool_ = [d for d in devices if d not in (evil, offline)]
            order = [pool_[j] for j in rng.permutation(len(pool_))[:args.per_round - 1]] + [evil]
            if r in (1, 5):
                order.append(offline)
            participations += len(order)
            k = max(1, len(order) // 12)
            drop = {d.name for d in order[:k]} | ({offline.name} if r == 1 else set())
            restart = {d.name for d in order[k:2 * k]}
            slow = {d.name for d in order[2 * k:3 * k]}
            dup = {d.name for d in order[3 * k:4 * k]}

            def one(d: Device) -> None:
                d.new_rows(r, args.rows, args.pad_rows)
                if d.name in drop:
                    cut_off = d.build(dead)
                    d.count(cut_off.run_once())  # trains from what it has; the delta waits in the outbox
                    cut_off.client.close()
                    d.restart()  # the usual agent again, from what the cut-off one left on disk
                elif d.name in restart:
                    rep = RoundReport()
                    d.agent.pull(rep)
                    d.agent.train(rep)  # in the outbox, then the process dies before pushing
                    d.restart()
                    d.count(rep)
                    d.count(d.agent.run_once())
                elif d.name in slow:
                    rep = RoundReport()
                    d.agent.pull(rep)
                    d.agent.train(rep)
                    d.count(rep)  # pushes after this round's version is made
                else:
                    d.count(d.agent.run_once())
                    if d.name in dup and d.last:  # a retry whose answer was lost: the same bytes again, stored once
                        d.agent.client.push(d.last)

            with ThreadPoolExecutor(args.workers) as pool:
                list(pool.map(one, order))
            faults["drops"] += len(drop)
            faults["restarts"] += len(restart)
            faults["slow"] += len(slow)
            faults["duplicates_sent"] += len(dup)
            faults["malicious_rounds"] += 1
            before = admin.request("GET", f"/api/v1/fleets/{FLEET}/versions").json()
            try:
                v = admin.request("POST", f"/api/v1/fleets/{FLEET}/adapters/default/aggregate", json=None).json()
            except HubRefused as e:  # 409: nothing was pending, or a retry of a POST whose answer timed out found the
                if e.status != 409:  # version that POST made: the newest version tells which
                    raise
                newest = admin.request("GET", f"/api/v1/fleets/{FLEET}/versions").json()[-1]
                if before and newest["version"] > before[-1]["version"]:
                    v = admin.request("GET", f"/api/v1/fleets/{FLEET}/adapters/default/versions/{newest['version']}/info").json()
                else:
                    v = {**newest, "report": {"count": 0}}
                    print(f"round {r + 1}: nothing reached the hub ({e}); the fleet keeps v{v['version']}", file=sys.stderr, flush=True)
            for d in devices:
                if d.name in slow:
                    rep = RoundReport()
                    d.agent.flush(rep)
                    d.count(rep)
            pulled = HubClient(url, devices[0].cfg.token).download_version(FLEET, "default", v["version"])[1]
            t_eval = time.perf_counter()
            acc = accuracy([unpack(pulled, manifest=bundle.manifest)])
            t_eval = time.perf_counter() - t_eval
            rep = v["report"]
            rounds.append({"round": r + 1, "version": v["version"], "accuracy": round(acc, 4), "merged": rep["count"],
                           "stale": rep.get("stale", 0), "clipped": rep.get("clipped", 0), "seconds": round(time.perf_counter() - t0, 1), "eval_seconds": round(t_eval, 1)})
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
        for d in devices:  # the last round: every device pushes what waits, and one more version takes it all
            d.count(d.agent.run_once() if d.agent.outbox.pending() else RoundReport())
        faults["refused_stale"] = sum(d.refused for d in devices)
        try:  # one more version takes what the last round left pending (409: nothing was)
            admin.request("POST", f"/api/v1/fleets/{FLEET}/adapters/default/aggregate", json=None)
        except HubRefused as e:
            if e.status != 409:
                raise
        versions = admin.request("GET", f"/api/v1/fleets/{FLEET}/versions").json()
        in_versions: list[str] = []
        for ver in versions:
            info = admin.request("GET", f"/api/v1/fleets/{FLEET}/adapters/default/versions/{ver['version']}/info").json()
            in_versions += info.get("deltas", [])
        accepted = [a for d in devices for a in d.accepted]
        lost = sorted(set(accepted) - set(in_versions))
        doubled = len(in_versions) - len(set(in_versions))
        wall = time.perf_counter() - t_start
    finally:
        hub.terminate()
        hub.wait(20)
    union = sorted({row for d in devices for row in d.seen})  # every row the fleet's devices were given
    central = centralized(bundle, union, accuracy, work, args.central_seeds)
    n = participations
    return {"devices": args.devices, "rounds": args.rounds, "devices_per_round": args.per_round, "rows_per_round": args.rows, "pad_rows": args.pad_rows,
            "alpha": args.alpha, "participations": participations,
            "ranks": list(ranks), "train": train, "lr_rounds": args.lr_rounds, "fleet_options": fleet_options(args), "held_out": len(held),
            "base_accuracy": round(base_accuracy, 4), "per_round": rounds,
            "fleet_accuracy": rounds[-1]["accuracy"], "fleet_last3": round(float(np.mean([r["accuracy"] for r in rounds[-3:]])), 4),
            "centralized": central,
            "gap_points": round(100 * (central["accuracy"] - rounds[-1]["accuracy"]), 2),
            "bytes_per_device_round": {"up": round(sum(d.bytes()[0] for d in devices) / n),
                                       "down": round(sum(d.bytes()[1] for d in devices) / n)},
            "faults": faults, "accepted": len(accepted), "accepted_lost": len(lost), "accepted_double_counted": doubled,
            "fleet_seconds": round(wall, 1)}


def centralized(bundle, union, accuracy, work: Path, seeds: int = 1) -> dict:
    """One pass over the union of the devices' data with the trainer's defaults at the bundle's rank (16), once per seed
    (its data order and LoRA A init): one seed's accuracy moves by about 2 points, as much as the target gap, so the
    fleet is compared to their mean."""
    data = load_dataset(write_jsonl(work / "union.jsonl", union), bundle.manifest, load_tokenizer(bundle))
    t0, accuracies, steps = time.perf_counter(), [], 0
    for seed in range(seeds):
        result = Trainer(bundle, data, TrainConfig(**CENTRAL, seed=seed)).fit()
        accuracies.append(accuracy([result.delta]))
        steps = result.summary.steps
    return {"rows": len(union), "steps": steps, **seed_summary(accuracies), "seconds": round(time.perf_counter() - t0, 1)}


def seed_summary(accuracies: list[float]) -> dict:
    """The centralized reference from its seeds' accuracies: their mean (what the fleet is compared to), each seed's,
    their spread (max - min) and sample standard deviation (0 for one seed)."""
    a = np.asarray(accuracies, dtype=np.float64)
    return {"accuracy": round(float(a.mean()), 4), "seeds": [round(float(x), 4) for x in a],
            "spread": round(float(a.max() - a.min()), 4), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (``--quick``: a smoke run's sizes)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=12, help="devices that train in a round (sampled; the malicious one always)")
    ap.add_argument("--rows", type=int, default=32, help="new rows per device per round (batch 16: 2 steps)")
    ap.add_argument("--pad-rows", action="store_true", help="fill a shard smaller than --rows with copies of itself (the "
                                                            "benchmark's draw before this option; results/fleet.json)")
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the label split")
    ap.add_argument("--eval-rows", type=int, default=300, help="held-out rows: the first N of the test split that are not training rows (1,278; "
                                                                 "300 rows are ±2.4 points of standard error at 78 %%)")
    ap.add_argument("--central-seeds", type=int, default=1, help="centralized runs on the union, seeds 0..N-1; the fleet is "
                                                                 "compared to their mean (default 1)")
    ap.add_argument("--workers", type=int, default=4, help="devices training at once")
    ap.add_argument("--lr", type=float, help=f"a device's lr (default {TRAIN['lr']})")
    ap.add_argument("--lr-rounds", type=int, default=0, help="a device's lr decays linearly over this many fleet versions "
                                                             "to lr/N (0: constant, the default)")
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), help="a device's optimizer (default: adamw)")
    ap.add_argument("--momentum", type=float, help="a device's SGD momentum (default 0)")
    ap.add_argument("--adam-eps", type=float, help="a device's AdamW epsilon (default 1e-8)")
    ap.add_argument("--prox", type=float, help="a device's pull toward the version it pulled, FedProx's mu (default 0)")
    ap.add_argument("--weight-decay", type=float, help="a device's weight decay (default 0.01)")
    ap.add_argument("--logit-adjust", type=float, help="the devices' --logit-adjust τ (balanced softmax at 1), in place of "
                                                         "label-balanced draws")
    ap.add_argument("--server-lr", type=float, help="the fleet's server step: fraction of the way to the mean (hub default 1)")
    ap.add_argument("--server-momentum", type=float, help="the fleet's server momentum, FedAvgM (hub default 0)")
    ap.add_argument("--out", type=result_name, default="fleet",
                    help="the results file's name: benchmarks/results/OUT.json (default fleet, README's main line; a "
                         "lever's run names its own so it does not overwrite that)")
    ap.add_argument("--quick", action="store_true", help="12 devices, 2 rounds: a smoke run (results not written)")
    args = ap.parse_args(argv)
    if args.quick:
        args.devices, args.rounds, args.per_round, args.eval_rows = 12, 2, 6, 100
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        result = run(args, Path(tmp), minilm_task(args.eval_rows))
    # what reproduces it, and the load it ran under (accuracies do not depend on load; the seconds do)
    own, hub = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))  # the hub is a child
    result.update(command=" ".join(["python benchmarks/bench_fleet.py", *(argv if argv is not None else sys.argv[1:])]),
                  load_average=round(os.getloadavg()[0], 1), cpu_seconds={"bench_process": round(own.ru_utime + own.ru_stime, 1),
                                                                          "hub": round(hub.ru_utime + hub.ru_stime, 1)})
    print(json.dumps(result, indent=1))
    if not args.quick:
        print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
