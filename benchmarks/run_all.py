"""The one command: every comparison of edgepeft against torch + PEFT, then the table and the plots.

Runs each benchmark module (``bench_<name>.py``; each writes ``benchmarks/results/<name>.json``), then
writes ``benchmarks/results/summary.md`` (every target with its measured ratio, met or not met, the
date, the machine and this command) and PNG plots beside it. Plots need matplotlib:
``pip install -e ".[bench]"`` (or ``pip install -c constraints.txt matplotlib``).

    python benchmarks/run_all.py                       # everything (about 13 minutes on 2 cores)
    python benchmarks/run_all.py --quick               # a smoke run of every part (minutes)
    python benchmarks/run_all.py --only train_step,footprint
    python benchmarks/run_all.py --table-only          # re-render summary.md and plots from the JSON
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

# Run order: the headline numbers first, the slow workstation export last.
BENCHMARKS = ["footprint", "delta_bytes", "time_to_accuracy", "train_step", "inference", "profile", "levers", "methods", "export",
              "llm"]
QUICK_SKIPS = {"export", "llm"}  # an export takes minutes (SmolLM2's: tens of them): --quick keeps the last results


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    if not p.is_file():
        return None
    res = json.loads(p.read_text())
    for r in res.get("rows", []):  # results written before rows were keyed by "config"
        r.setdefault("config", r.get("name"))
    return res


def _row(res: dict | None, config: str) -> dict | None:
    return next((r for r in (res or {}).get("rows", []) if r["config"] == config), None)


def _time_ratio(ours: dict, theirs: dict) -> float | None:
    """edgepeft's seconds to the target over torch's; a bound (torch's whole run) when torch never reached it."""
    if ours["seconds_to_target"] is None:
        return None
    return round(ours["seconds_to_target"] / (theirs["seconds_to_target"] or theirs["train_s_all_steps"]), 3)


def _seeds_note(tta: dict, ours: dict) -> str:
    """'; median of N seeds, per-seed ratios a-b×' where the run had several seeds (older results: one, unnamed)."""
    seeds, spread = tta.get("seeds") or [0], ours.get("time_ratio_spread")
    return f"; median of {len(seeds)} seeds, per-seed ratios {spread[0]:.2f}-{spread[1]:.2f}×" if len(seeds) > 1 and spread else ""


def targets(r: dict[str, dict | None]) -> list[dict]:
    """The push's targets: measured value, the bound, met or not, and where the number comes from."""
    tta, fp, db = r.get("time_to_accuracy"), r.get("footprint"), _row(r.get("delta_bytes"), "default export")
    ours, theirs = _row(tta, "edgepeft defaults"), _row(tta, "torch+peft usual recipe")
    fp32 = _row(tta, "edgepeft defaults with fp32 weights")
    mt = (r.get("methods") or {}).get("targets", {})
    llm = r.get("llm") or {}
    lr, lt, lx = (llm.get("ratios") or {}).get("edgepeft_int8", {}), llm.get("torch_peft_fp32"), (llm.get("export") or {})
    le = llm.get("edgepeft_int8")
    dev, ref = _row(fp, "edgepeft device install (pip install .)"), _row(fp, "torch + transformers + peft")
    specs = [  # (target, bound, value, test, how it reads) -- value and reading as lambdas: results may be missing
        ("time to accuracy vs torch + PEFT", "≤ 0.33×", lambda: _time_ratio(ours, theirs), lambda v: v <= 0.33,
         lambda v: f"{v:.2f}× ({ours['seconds_to_target']} s vs {theirs['seconds_to_target']} s to {tta['target']:.0%} validation accuracy"
                   + _seeds_note(tta, ours) + ")"
         if theirs["seconds_to_target"] else f"< {v:.2f}× ({ours['seconds_to_target']} s to {tta['target']:.0%} validation accuracy; "
         f"torch + PEFT had not reached it after {theirs['train_s_all_steps']} s, all {tta['steps']} steps)"),
        ("peak training memory vs torch + PEFT", "≤ 0.4×", lambda: ours["peak_ratio_vs_torch"], lambda v: v <= 0.4,
         lambda v: f"{v:.2f}× ({ours['peak_rss_mb']:.0f} MB vs {theirs['peak_rss_mb']:.0f} MB)"),
        ("device install vs torch + transformers + peft", "≤ 0.2×", lambda: dev["installed_ratio_vs_torch"], lambda v: v <= 0.2,
         lambda v: f"{v:.3f}× ({dev['installed_mb']} MB vs {ref['installed_mb']} MB)"),
        ("packed delta vs bundle", "≤ 0.5 %", lambda: db["packed_share_of_bundle"], lambda v: v <= 0.005,
         lambda v: f"{100 * v:.2f} % ({db['delta_packed_bytes'] / 1024:.0f} KB of {db['bundle_bytes'] / 2**20:.1f} MB)"),
        ("int8 test accuracy vs fp32 (same recipe and steps)", "within 1 point",
         lambda: round(100 * (ours["test_accuracy"] - fp32["test_accuracy"]), 2), lambda v: abs(v) <= 1.0,
         lambda v: f"{v:+.2f} points ({100 * ours['test_accuracy']:.1f} % vs {100 * fp32['test_accuracy']:.1f} %)"),
        ("every method vs torch + PEFT running it (same start and batches)", "within 1 point", lambda: mt["largest_gap_points"],
         lambda v: v <= 1.0, lambda v: f"largest gap {v:.2f} points"),
        ("a method with a ≤ 2 KB packed delta vs LoRA r=8", "within 1.5 points", lambda: mt["best_small_delta_points_below_lora"],
         lambda v: v <= 1.5, lambda v: f"{mt['best_small_delta']}: {v:+.2f} points below LoRA"),
        ("SmolLM2-135M: peak training memory vs torch + PEFT (batch 4 × 256)", "≤ 0.4×", lambda: lr["train_peak"],
         lambda v: v <= 0.4, lambda v: f"{v:.2f}× ({le['train_peak_mb']:.0f} MB vs {lt['train_peak_mb']:.0f} MB)"),
        ("SmolLM2-135M: train step time vs torch + PEFT", "≤ 1.0×", lambda: lr["step_time"], lambda v: v <= 1.0,
         lambda v: f"{v:.2f}× ({le['step_s']:.2f} s vs {lt['step_s']:.2f} s)"),
        ("SmolLM2-135M: validation perplexity after the same steps vs torch + PEFT", "within 2 %",
         lambda: round(100 * (lr["val_ppl_after"] - 1), 2), lambda v: abs(v) <= 2.0,
         lambda v: f"{v:+.2f} % ({le['val_ppl_after']:.2f} vs {lt['val_ppl_after']:.2f}, from {le['val_ppl_before']:.2f} and {lt['val_ppl_before']:.2f})"),
        ("SmolLM2-135M: generation tokens/s vs torch (base / with the LoRA delta)", "≥ 1.0×",
         lambda: min(lr["gen_base"], lr["gen_lora"]), lambda v: v >= 1.0,
         lambda v: f"{lr['gen_base']:.2f}× / {lr['gen_lora']:.2f}×"),
        ("SmolLM2-135M: export time vs a plain torch.onnx.export of the inference graph (CPU seconds)", "≤ 3×",
         lambda: lx["int8"]["cpu_ratio_vs_plain"], lambda v: v <= 3.0,
         lambda v: f"{v:.2f}× ({lx['int8']['export_cpu_s']:.0f} s vs {lx['plain']['plain_export_cpu_s']:.0f} s; wall "
                   f"{lx['int8']['export_s']:.0f} s vs {lx['plain']['plain_export_s']:.0f} s; peak "
                   f"{lx['int8']['export_peak_mb']:.0f} MB vs {lx['plain']['plain_export_peak_mb']:.0f} MB)"),
    ]
    out = []
    for name, bound, value, test, reads in specs:
        try:
            v = value()
            shown = reads(v) if v is not None else "target accuracy not reached"
        except (KeyError, TypeError):
            v, shown = None, "not measured yet"
        out.append({"target": name, "bound": bound, "value": v, "shown": shown, "met": None if v is None else bool(test(v))})
    return out


def _cell(key: str, v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and ("share" in key or key.startswith("packed_share")):
        return f"{100 * v:.2f} %" if v < 0.01 else f"{100 * v:.0f} %"
    if isinstance(v, int) and v >= 10000:
        return f"{v:,}"
    return str(v)


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(h for h, _ in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join("| " + " | ".join(_cell(k, r.get(k)) for _, k in cols) + " |\n" for r in rows)
    return head + body


def summary(command: str, seconds: float | None) -> str:
    names = BENCHMARKS
    r = {n: _load(n) for n in names}
    dates = sorted(x["date"] for x in r.values() if x)
    lines = ["# edgepeft vs torch + PEFT: measured side by side", "",
             f"- date: {dates[-1] if dates else 'n/a'} (UTC; oldest result in this table: {dates[0] if dates else 'n/a'})",
             f"- machine: {', '.join(sorted({x['machine'] for x in r.values() if x})) or machine()}",  # the one that measured
             f"- command: `{command}`" + (f" ({seconds / 60:.1f} minutes)" if seconds else
                                          " (sections measured by separate runs: each names its date and settings)"),
             "- model: all-MiniLM-L6-v2 (22.7M parameters); every ratio is edgepeft ÷ torch + PEFT, measured in the same run,",
             "  each configuration in its own process, rounds alternating order.", "", "## Targets", "",
             "| target | bound | measured | met |", "|---|---|---|---|"]
    for t in targets(r):
        met = "n/a" if t["met"] is None else ("**met**" if t["met"] else "not met")
        lines.append(f"| {t['target']} | {t['bound']} | {t['shown']} | {met} |")
    sections = [
        ("train_step", "1. Train step, batch 8, length 128", [("configuration", "config"), ("step ms", "step_ms"),
         ("× torch eager", "step_ratio"), ("peak RSS MB", "peak_rss_mb"), ("× torch", "peak_ratio"),
         ("RSS after load MB", "rss_after_load_mb"), ("GFLOP", "gflop"), ("share of fp32 peak", "share_of_fp32_peak")]),
        ("time_to_accuracy", "2. Time to accuracy, Rotten Tomatoes (medians over seeds; [min, max])", [("configuration", "config"),
         ("s to target", "seconds_to_target"), ("spread", "seconds_to_target_spread"), ("× torch", "time_ratio_vs_torch"),
         ("per-seed × torch", "time_ratio_spread"), ("s to hold", "seconds_to_hold"), ("steps to target", "steps_to_target"),
         ("peak RSS MB", "peak_rss_mb"), ("× torch", "peak_ratio_vs_torch"), ("padded tokens", "padded_tokens"),
         ("best val acc", "best_val_accuracy"), ("test acc", "test_accuracy"), ("test Δ points vs torch", "test_accuracy_delta_vs_torch")]),
        ("footprint", "3. Footprint", [("install", "config"), ("installed MB", "installed_mb"), ("× torch", "installed_ratio_vs_torch"),
         ("distributions", "distributions"), ("RSS after import MB", "rss_after_import_mb"), ("× torch", "rss_ratio_vs_torch")]),
        ("delta_bytes", "4. Bytes that travel", [("bundle", "config"), ("bundle bytes", "bundle_bytes"),
         ("delta raw", "delta_raw_bytes"), ("delta packed", "delta_packed_bytes"), ("packed ÷ bundle", "packed_share_of_bundle"),
         ("PEFT adapter_model.safetensors", "peft_adapter_bytes_torch"), ("packed ÷ PEFT", "packed_vs_peft_adapter")]),
        ("inference", "5. Inference latency per call (batch 1, 32 tokens)", [("engine", "config"), ("base ms", "base ms"),
         ("× torch", "base ratio_vs_torch"), ("one LoRA ms", "one LoRA ms"), ("× torch", "one LoRA ratio_vs_torch"),
         ("mix of two ms", "mix of two ms"), ("× torch", "mix of two ratio_vs_torch"), ("RSS after load MB", "rss_after_load_mb")]),
        ("methods", "Methods: every method + head, same step budget", [("method", "method"), ("test acc", "test_accuracy"),
         ("torch + PEFT test acc", "torch_peft_test_accuracy"), ("gap (points)", "gap_points"), ("trainable", "trainable"),
         ("packed delta bytes", "packed_bytes"), ("s/step", "step_s"), ("peak RSS MB", "peak_rss_mb")]),
        ("export", "6. Export (workstation side)", [("export", "config"), ("seconds", "seconds"), ("× plain", "time_ratio_vs_plain"),
         ("peak RSS MB", "peak_rss_mb"), ("size MB", "size_mb")]),
        ("llm", "7. SmolLM2-135M-Instruct: LoRA r=8 on q/v of the top 10 of 30 layers, batch 4 × 256", [
         ("side", "config"), ("s/step", "step_s"), ("CPU s/step", "step_cpu_s"), ("peak RSS MB (training)", "train_peak_mb"),
         ("RSS before training MB", "rss_before_train_mb"), ("val ppl before", "val_ppl_before"),
         ("val ppl after", "val_ppl_after"), ("tokens/s base", "gen_base_tokens_per_s"),
         ("tokens/s with LoRA", "gen_lora_tokens_per_s")]),
        ("levers", "Levers, one at a time (edgepeft train step, batch 16, length 48)", [("change", "config"), ("step ms", "step_ms"),
         ("× default", "step_ratio"), ("peak RSS MB", "peak_rss_mb"), ("× default", "peak_ratio"), ("GFLOP", "gflop")]),
    ]
    sections.append(("profile", "Profile: where a train step's time goes (batch 16, length 48)", None))
    for name, title, cols in sections:
        res = r.get(name)
        lines += ["", f"## {title}", ""]
        if not res:
            lines.append(f"(no results/{name}.json yet: `python benchmarks/run_all.py --only {name}`)")
            continue
        settings = ", ".join(f"{k} {res[k]}" for k in ("rounds", "seeds", "steps", "calls", "eval_every", "eval_rows", "target") if k in res)
        lines.append(f"{res.get('benchmark', '')}; measured {res['date']}" + (f" ({settings})." if settings else "."))
        lines.append("")
        if name == "profile":
            for row in res["rows"]:
                lines += [f"**{row['config']}**: {row['step_ms']} ms per step", "",
                          _table(row["ops"], [("operator", "op"), ("ms per step", "ms_per_step"), ("share", "share")]).rstrip(), ""]
            continue
        lines.append(_table(res["rows"], cols).rstrip())
        if name == "llm" and res.get("export"):
            x = res["export"]
            rows = [{"config": "torch.onnx.export, inference only (fp32)", "seconds": x["plain"]["plain_export_s"],
                     "cpu_s": x["plain"]["plain_export_cpu_s"], "peak_rss_mb": x["plain"]["plain_export_peak_mb"]}] \
                if "plain" in x else []
            rows += [{"config": f"edgepeft export --quantize {q} (inference + train step)", "seconds": x[q]["export_s"],
                      "cpu_s": x[q]["export_cpu_s"], "cpu_ratio_vs_plain": x[q].get("cpu_ratio_vs_plain"),
                      "peak_rss_mb": x[q]["export_peak_mb"]} for q in ("int8", "int4") if q in x]
            lines += ["", _table(rows, [("export of the GGUF", "config"), ("wall s", "seconds"), ("CPU s", "cpu_s"),
                                        ("CPU × plain", "cpu_ratio_vs_plain"), ("peak RSS MB", "peak_rss_mb")]).rstrip()]
        if name == "levers" and res.get("bucketing"):
            lines += ["", _table(res["bucketing"], [("batching (one epoch of RT train, batch 16)", "config"),
                                                    ("padded tokens", "padded_tokens_per_epoch"),
                                                    ("× shuffled", "tokens_ratio_vs_shuffled"),
                                                    ("padding share", "padding_share")]).rstrip()]
    lines += devices()
    lines += fleet()
    notes = RESULTS / "notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def devices() -> list[str]:
    """Summary lines of the device scripts' committed outputs (scripts/device-*.sh; not run by this command)."""
    lines = ["", "## Devices (scripts/device-aarch64.sh, scripts/device-pi-profile.sh)", ""]
    a, p = _load("device_aarch64"), _load("device_pi")
    if a:
        lines.append(f"- aarch64 under qemu-user ({a['emulator']}), {a['device']['machine']} vs {a['reference']['machine']}, "
                     f"onnxruntime {a['device']['onnxruntime']}: agree {a['agree']}; largest loss difference "
                     f"{a['max_abs_loss_diff']:.4f}, delta {a['max_rel_delta_diff']:.1e} relative, logits "
                     f"{a['max_abs_logit_diff']:.1e}; validation accuracy {' % → '.join(map(str, a['val_accuracy_pct_before_after']['device']))} %; "
                     f"device install {a['device_install_seconds']} s, {a['device_venv_mb']} MB.")
    if p:
        lines.append(f"- Raspberry-Pi-like profile, measured {p['date']} ({p['profile']['cpu']}; {p['memory_cap_mb']} MB "
                     f"{p['profile']['memory']}): {p['steps']} steps at {p['steps_per_s']} steps/s, peak RSS "
                     f"{p['peak_rss_mb']:.0f} MB (cgroup {p['cgroup_peak_mb_training']:.0f} MB, {p['oom_kills']} OOM kills) "
                     f"with {p['memory_plan']}; test accuracy {100 * p['test_accuracy']:.1f} % "
                     f"(base {100 * p['base_test_accuracy']:.1f} %).")
    return lines if a or p else []


FLEET_MAIN = "fleet_40_per_round"  # the run README's fleet section leads with


def fleet() -> list[str]:
    """Summary lines of README's main fleet run (benchmarks/bench_fleet.py, ~40 minutes; not run by this command)."""
    f = _load(FLEET_MAIN)
    if not f:
        return []
    curve = ", ".join(f"{100 * r['accuracy']:.1f}" for r in f["per_round"])
    c = f["centralized"]
    return ["", f"## Fleet ({f.get('command', 'python benchmarks/bench_fleet.py')})", "",
            f"- measured {f['date']}: {f['devices']} devices (ranks {', '.join(map(str, f['ranks']))}), Dirichlet α = {f['alpha']} "
            f"label-skewed Rotten Tomatoes shards, {f['devices_per_round']} devices training {f['rows_per_round']} new rows each "
            f"per round, {f['rounds']} rounds; "
            f"held-out accuracy per version (%): {curve}; centralized on the union ({c['rows']} rows, {c['steps']} steps) "
            f"{100 * c['accuracy']:.1f} % ({f['gap_points']:+.2f} points above the fleet; the mean of {len(c.get('seeds', [0]))} seed(s)).",
            f"- per device per round: {f['bytes_per_device_round']['up'] / 1000:.1f} KB up, "
            f"{f['bytes_per_device_round']['down'] / 1000:.1f} KB down; faults survived: "
            + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in f["faults"].items())
            + f"; {f['accepted']} deltas accepted, {f['accepted_lost']} lost, {f['accepted_double_counted']} double-counted."]


def plots() -> list[Path]:
    """Step time and memory bars (train step, levers), time-to-accuracy curves; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is missing; install it with: pip install -e \".[bench]\"", file=sys.stderr)
        return []
    out = []
    for name, title in (("train_step", "train step, batch 8 × 128"), ("levers", "edgepeft levers, batch 16 × 48")):
        res = _load(name)
        if not res:
            continue
        rows = res["rows"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5))
        labels = [r["config"] for r in rows]
        colors = ["#c44e52" if r["config"].startswith("torch") else "#4c72b0" for r in rows]
        for ax, key, xlabel in ((axes[0], "step_ms", "median step time (ms)"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
            ax.barh(labels, [r[key] for r in rows], color=colors)
            ax.invert_yaxis()
            ax.set_xlabel(xlabel)
        axes[1].set_yticklabels([])
        fig.suptitle(f"{title} ({res['date'][:10]})")
        fig.tight_layout()
        path = RESULTS / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    res = _load("time_to_accuracy")
    if res:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, runs in res["raw"].items():
            c = runs[0]["curve"]
            ax.plot([p["train_s"] for p in c], [100 * p["val_accuracy"] for p in c], marker="o", ms=3,
                    label=f"{name} (peak {runs[0]['peak_rss_mb']:.0f} MB)")
        ax.axhline(100 * res["target"], color="gray", ls="--", lw=1, label=f"target {res['target']:.0%}")
        ax.set_xlabel("training seconds (evaluation excluded)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"Rotten Tomatoes, all-MiniLM-L6-v2, batch {res['batch']} ({res['date'][:10]})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = RESULTS / "time_to_accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true", help="smoke settings for every benchmark (export is not re-run)")
    ap.add_argument("--table-only", action="store_true", help="only re-render summary.md and the plots from results/*.json")
    args = ap.parse_args()
    chosen = BENCHMARKS if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    command = "python benchmarks/run_all.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    t_all = time.perf_counter()
    if not args.table_only:
        for name in chosen:
            if args.quick and name in QUICK_SKIPS and not args.only:
                print(f"== {name}: skipped under --quick (keeps results/{name}.json)", file=sys.stderr)
                continue
            print(f"== {name}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            importlib.import_module(f"bench_{name}").main(["--quick"] if args.quick else [])
            print(f"== {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    seconds = None if args.table_only else time.perf_counter() - t_all
    if args.table_only:  # keep the command and duration of the run that made the numbers
        prev = RESULTS / "run.json"
        meta = json.loads(prev.read_text()) if prev.is_file() else {}
        command, seconds = meta.get("command", "python benchmarks/run_all.py"), meta.get("seconds")
    else:
        (RESULTS / "run.json").write_text(json.dumps({"command": command, "seconds": round(seconds, 1),
                                                      "benchmarks": chosen}, indent=1) + "\n")
    (RESULTS / "summary.md").write_text(summary(command, seconds))
    made = plots()
    print((RESULTS / "summary.md").read_text())
    print(f"wrote {RESULTS / 'summary.md'}" + "".join(f", {p.name}" for p in made)
          + (f" in {seconds / 60:.1f} minutes" if seconds and not args.table_only else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
