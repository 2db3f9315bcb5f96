"""Why the fleet trails centralized training: the fleet loop in one process, no hub, one lever changed at a time.

    python benchmarks/fleet_diagnose.py [--devices 100] [--per-round 10] [--rounds 6] [--rows 128] CONFIG...

Each CONFIG is ``name:key=value,key=value`` over: ``lr`` (device lr), ``epochs``, ``balance`` (1: label-balanced
draws), ``logit_adjust`` (the device trainer's --logit-adjust τ), ``optimizer`` (adamw | sgd), ``momentum`` (SGD's),
``adam_eps``, ``prox`` (the pull toward the pulled version, FedProx's mu), ``weight_decay``, ``robust`` (1: the hub's defaults,
median clipping + 20 % trimmed mean; 0: plain weighted mean), ``server_lr``, ``server_momentum`` (the hub's server step),
``ranks`` (1: devices at rank 4/8/16 pull refitted versions; 0: all at 16). The shards, the devices drawn each round and
the rows they get are the same for every config (seeded), so accuracies differ by the lever alone. Every device is
honest and fresh: this isolates the learning dynamics from the faults ``bench_fleet.py`` adds. Prints per round the
held-out accuracy and the share of "fresh" predictions (a version that learnt one device's prior predicts one class).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_fleet import RANKS, TRAIN, dirichlet_shards, shared_bundle  # noqa: E402
from common import minilm_bundle  # noqa: E402

from edgepeft.delta.format import replace_meta  # noqa: E402
from edgepeft.delta.ranks import rebase, refit  # noqa: E402
from edgepeft.demo.assets import rotten_tomatoes_split, write_jsonl  # noqa: E402
from edgepeft.hub.aggregate import bundle_lora, combine  # noqa: E402
from edgepeft.hub.robust import RobustOptions, clip_update, update_norm  # noqa: E402
from edgepeft.runtime.data import load_dataset  # noqa: E402
from edgepeft.runtime.infer import Predictor  # noqa: E402
from edgepeft.runtime.text import load_tokenizer  # noqa: E402
from edgepeft.runtime.trainer import TrainConfig, Trainer  # noqa: E402

_T = TrainConfig()  # the trainer's own defaults for the optimizer's options
DEFAULTS = {"lr": TRAIN["lr"], "epochs": TRAIN["epochs"], "balance": 1, "logit_adjust": 0.0, "optimizer": _T.optimizer,
            "momentum": _T.momentum, "adam_eps": _T.adam_eps, "prox": _T.prox, "weight_decay": _T.weight_decay, "robust": 1,
            "server_lr": 1.0, "server_momentum": 0.0, "ranks": 1}


def parse_config(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    cfg = dict(DEFAULTS)
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=")
        if k not in cfg:
            raise SystemExit(f"unknown key {k!r}; known: {', '.join(cfg)}")
        cfg[k] = type(cfg[k])(float(v)) if isinstance(cfg[k], (int, float)) else v
    return name, cfg


def run_config(cfg: dict, bundle, shards, plan, held, work: Path) -> list[dict]:
    tok = load_tokenizer(bundle)
    predictor = Predictor(bundle)
    rank, scale = bundle_lora(bundle.manifest)
    options = RobustOptions() if cfg["robust"] else RobustOptions(clip_median=None, trim=0)
    options = RobustOptions(**{**options.to_dict(), "server_lr": cfg["server_lr"], "server_momentum": cfg["server_momentum"]})
    versions: list = []  # published versions, oldest first
    out = []
    for r, picks in enumerate(plan):
        parent = versions[-1] if versions else None
        deltas = []
        for i, rows in picks:
            dev_rank = RANKS[i % len(RANKS)] if cfg["ranks"] else rank
            start = parent if parent is None or dev_rank == rank else refit(parent, dev_rank)[0]
            data = load_dataset(write_jsonl(work / f"r{r}-d{i}.jsonl", rows), bundle.manifest, tok)
            train = {**TRAIN, "lr": cfg["lr"], "epochs": cfg["epochs"], "rank": dev_rank,
                     "balance_labels": bool(cfg["balance"]), "logit_adjust": cfg["logit_adjust"],
                     "optimizer": cfg["optimizer"], "momentum": cfg["momentum"], "adam_eps": cfg["adam_eps"],
                     "prox": cfg["prox"], "weight_decay": cfg["weight_decay"]}
            d = Trainer(bundle, data, TrainConfig(**train), start=start).fit().delta
            if start is not None and dev_rank != rank:
                d = rebase(d, start, parent)
            deltas.append(replace_meta(d, samples=len(rows)))
        merged = aggregate(deltas, parent, versions[-2] if len(versions) > 1 else None, bundle.manifest, options)
        versions.append(replace_meta(merged, version=r + 1))
        preds = predictor.classify([t for t, _ in held], [merged])
        acc = float(np.mean([p.label == l for p, (_, l) in zip(preds, held)]))
        fresh = float(np.mean([p.label == "fresh" for p in preds]))
        out.append({"round": r + 1, "accuracy": round(acc, 4), "fresh_share": round(fresh, 3),
                    "update_norm": round(update_norm(merged, parent), 4)})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def aggregate(deltas, parent, grand, manifest, options: RobustOptions):
    """The hub's merge of one round in process: clipped to the median update norm when the options say so, then combined."""
    bound = float(np.median([update_norm(d, parent) for d in deltas])) if options.clip_median is not None else None

    def pairs():
        for d in deltas:
            yield (clip_update(d, parent, bound)[0] if bound else d), float(d.meta.samples)

    return combine(pairs, len(deltas), manifest, options, parent=parent, grandparent=grand)[0]


def stability(accuracies: list[float], last: int = 3) -> dict:
    """Where a config ends and how much it swings there: the mean and the range of the last rounds' accuracies."""
    tail = accuracies[-last:]
    return {f"last{last}_mean": round(float(np.mean(tail)), 4), f"last{last}_range": round(max(tail) - min(tail), 4)}


def analyse(bundle, plan, held, work: Path, rounds: int, lr: float) -> list[dict]:
    """One set of device deltas per round, aggregated every way: which step of the merge loses accuracy."""
    tok = load_tokenizer(bundle)
    predictor = Predictor(bundle)
    rank, _ = bundle_lora(bundle.manifest)

    def score(d) -> dict:
        preds = predictor.classify([t for t, _ in held], [d])
        return {"acc": round(float(np.mean([p.label == l for p, (_, l) in zip(preds, held)])), 4),
                "fresh": round(float(np.mean([p.label == "fresh" for p in preds])), 3)}

    ways = {"plain": RobustOptions(clip_median=None, trim=0), "clip": RobustOptions(trim=0),
            "trim": RobustOptions(clip_median=None), "defaults": RobustOptions(),
            "defaults_server_lr2": RobustOptions(server_lr=2.0)}
    parent, out = None, []
    for r, picks in enumerate(plan[:rounds]):
        deltas, own = [], []
        for i, rows in picks:
            dev_rank = RANKS[i % len(RANKS)]
            start = parent if parent is None or dev_rank == rank else refit(parent, dev_rank)[0]
            data = load_dataset(write_jsonl(work / f"r{r}-d{i}.jsonl", rows), bundle.manifest, tok)
            d = Trainer(bundle, data, TrainConfig(**{**TRAIN, "lr": lr, "rank": dev_rank}), start=start).fit().delta
            own.append({**score(d), "fresh_rows": round(sum(l == "fresh" for _, l in rows) / len(rows), 2), "rank": dev_rank})
            if start is not None and dev_rank != rank:
                d = rebase(d, start, parent)
            deltas.append(replace_meta(d, samples=len(rows)))
        row = {"round": r + 1, "devices": own, "norms": sorted(round(update_norm(d, parent), 3) for d in deltas)}
        for name, opts in ways.items():
            merged = aggregate(deltas, parent, None, bundle.manifest, opts)
            row[name] = {**score(merged), "update_norm": round(update_norm(merged, parent), 3)}
            if name == "defaults":
                row["defaults_at_rank"] = {str(k): score(refit(merged, k)[0])["acc"] for k in RANKS if k != rank}
                nxt = merged
        print(json.dumps(row), file=sys.stderr, flush=True)
        out.append(row)
        parent = nxt
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*")
    ap.add_argument("--analyse", type=int, default=0, help="instead of CONFIGs: this many rounds, each merged every way")
    ap.add_argument("--lr", type=float, default=TRAIN["lr"], help="the devices' lr in --analyse")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--eval-rows", type=int, default=300)
    args = ap.parse_args(argv)
    bundle = shared_bundle(minilm_bundle("int8", "lora+bitfit", top_layers=2, max_length=64, rank=max(RANKS)))
    split = rotten_tomatoes_split(seed=0)
    held = split["test"][: args.eval_rows]
    shards = dirichlet_shards(split["train"], args.devices, args.alpha, seed=0)
    rng = np.random.default_rng(1)
    plan = []  # per round: (device, its rows), the same for every config
    for r in range(args.rounds):
        picks = rng.permutation(args.devices)[: args.per_round]
        plan.append([(int(i), (shards[i] * (1 + args.rows // len(shards[i]) + 1))[(r * args.rows) % len(shards[i]):][: args.rows])
                     for i in picks])
    if args.analyse:
        with tempfile.TemporaryDirectory(prefix="fleet-diag-") as tmp:
            print(json.dumps({"args": vars(args), "analysis": analyse(bundle, plan, held, Path(tmp), args.analyse, args.lr)}, indent=1))
        return
    results = {}
    for text in args.configs:
        name, cfg = parse_config(text)
        print(f"== {name} {cfg}", file=sys.stderr, flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory(prefix="fleet-diag-") as tmp:
            rounds = run_config(cfg, bundle, shards, plan, held, Path(tmp))
        results[name] = {"config": cfg, "rounds": rounds, **stability([r["accuracy"] for r in rounds]),
                         "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
    print(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
