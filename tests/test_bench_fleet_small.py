"""bench_fleet's simulation, reduced: a handful of device agents on the tiny BERT bundle against a real hub process,
label-skewed shards, mixed ranks and every fault of the benchmark (a drop, a restart, a slow and thereby stale device,
a duplicate push, a device offline past the staleness window, one malicious device). The benchmark that README's fleet
figures come from keeps working, and its guarantees hold at a size the suite can afford."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import bench_fleet  # noqa: E402
from synthetic_tasks import word_group_rows  # noqa: E402

ROUNDS = 4
# the tiny bundle's random encoder needs some 50 steps before its word groups separate: six label-balanced passes over a
# round's rows in batches of 8
TRAIN = {"epochs": 6, "batch_size": 8, "lr": 2e-2, "schedule": "constant", "balance_labels": True, "threads": 1,
         "checkpoint_every": 0}


def rows(n: int, seed: int) -> list[tuple[str, str]]:
    return [(r["text"], r["label"] if isinstance(r["label"], str) else f"LABEL_{r['label']}") for r in word_group_rows(n, seed)]


@pytest.fixture(scope="module")
def run(bundles, tmp_path_factory):
    """One reduced run: 8 devices at rank 2 or 4, 6 training per round (the malicious one always) for 4 rounds, one at a
    time (the same order every run), the fleet on server momentum 0.9; the centralized reference from 2 seeds."""
    task = bench_fleet.Task(bundles("bert").path, rows(400, 0), rows(150, 1), ranks=(2, 4), options=TRAIN)
    args = bench_fleet.parse_args(["--devices", "8", "--per-round", "6", "--rows", "96", "--rounds", str(ROUNDS),
                                   "--workers", "1", "--server-momentum", "0.9", "--central-seeds", "2"])
    return bench_fleet.run(args, tmp_path_factory.mktemp("fleet"), task)


def test_no_accepted_delta_is_lost_or_counted_twice(run):
    assert run["accepted"] > 0
    assert (run["accepted_lost"], run["accepted_double_counted"]) == (0, 0)


def test_every_fault_of_the_benchmark_happened(run):
    f = run["faults"]
    assert min(f["drops"], f["restarts"], f["slow"], f["duplicates_sent"]) >= ROUNDS
    assert f["malicious_rounds"] == ROUNDS and f["refused_stale"] >= 1  # the offline one came back too stale, retrained
    assert sum(r["stale"] for r in run["per_round"]) >= 1  # slow devices' deltas went into a later version, weighted down


def test_the_fleet_adapter_beats_the_base_model_on_held_out_rows(run):
    assert run["base_accuracy"] < 0.5  # 3 word groups: the untrained head is near chance
    assert run["fleet_accuracy"] >= run["base_accuracy"] + 0.25


def test_the_centralized_reference_is_the_mean_of_its_seeds_and_the_gap_is_taken_from_it(run):
    c = run["centralized"]
    assert len(c["seeds"]) == 2 and c["accuracy"] == pytest.approx(sum(c["seeds"]) / 2, abs=1e-4)
    assert c["spread"] == pytest.approx(max(c["seeds"]) - min(c["seeds"]), abs=1e-4)
    assert run["gap_points"] == pytest.approx(100 * (c["accuracy"] - run["fleet_accuracy"]), abs=1e-2)


def test_the_seed_summary_gives_mean_spread_and_sample_std():
    s = bench_fleet.seed_summary([0.80, 0.78, 0.82])
    assert (s["accuracy"], s["seeds"], s["spread"], s["std"]) == (0.8, [0.8, 0.78, 0.82], 0.04, 0.02)
    assert bench_fleet.seed_summary([0.7])["std"] == 0.0


def test_the_held_out_rows_are_the_test_splits_less_any_training_row_in_order():
    test = [("a", "fresh"), ("b", "rotten"), ("c", "fresh"), ("d", "rotten")]
    assert bench_fleet.held_out(test, [("b", "rotten"), ("x", "fresh")], 10) == [("a", "fresh"), ("c", "fresh"), ("d", "rotten")]
    assert bench_fleet.held_out(test, [("b", "rotten")], 2) == [("a", "fresh"), ("c", "fresh")]


def test_the_benchmarks_held_out_rows_hold_no_training_row_and_its_first_300_are_the_earlier_runs(monkeypatch):
    monkeypatch.setattr(bench_fleet, "minilm_bundle", lambda *a, **k: Path("bundle"))
    split = bench_fleet.rotten_tomatoes_split(seed=0)
    task = bench_fleet.minilm_task(10_000)
    assert len(task.held) == 1278 and not set(task.held) & set(task.train)  # 4 of the test split's rows repeat training rows
    assert bench_fleet.minilm_task(300).held == split["test"][:300]


def test_the_fleets_server_step_is_recorded(run):
    assert run["fleet_options"] == {"server_momentum": 0.9}


@pytest.fixture
def stubbed_main(monkeypatch, tmp_path):
    """bench_fleet.main with the fleet run stubbed out and benchmarks/results/ moved to a temporary folder."""
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_fleet, "minilm_task", lambda eval_rows: None)
    monkeypatch.setattr(bench_fleet, "run", lambda args, work, task: {"rounds": args.rounds})
    return tmp_path


def test_a_named_run_writes_its_own_results_file_and_leaves_the_main_line(stubbed_main):
    bench_fleet.main(["--rounds", "3", "--out", "fleet_lever"])
    assert sorted(p.name for p in stubbed_main.iterdir()) == ["fleet_lever.json"]


def test_an_unnamed_run_writes_the_main_line(stubbed_main):
    bench_fleet.main(["--rounds", "3"])
    assert sorted(p.name for p in stubbed_main.iterdir()) == ["fleet.json"]


@pytest.mark.parametrize("name", ["../fleet", "results/fleet", "fleet.json", ".hidden", ""])
def test_a_results_name_that_is_not_a_plain_name_is_refused(name):
    with pytest.raises(SystemExit):
        bench_fleet.parse_args(["--out", name])


def test_the_device_lr_is_constant_by_default():
    assert [bench_fleet.round_lr(5e-3, v, 0) for v in (0, 3, 40)] == [5e-3] * 3


def test_the_device_lr_decays_linearly_over_the_stated_versions_and_then_holds_above_zero():
    lrs = [bench_fleet.round_lr(8e-3, v, 4) for v in range(7)]
    assert lrs == pytest.approx([8e-3, 6e-3, 4e-3, 2e-3, 2e-3, 2e-3, 2e-3])



SHARD = [(f"row {i}", "fresh" if i % 5 else "rotten") for i in range(16)]


def test_a_small_shard_gives_its_own_rows_once_a_round_not_copies_of_them():
    given = bench_fleet.round_rows(SHARD, 3, 128)
    assert sorted(given) == sorted(SHARD)


def test_a_small_shard_comes_in_a_new_order_each_round_so_the_agent_trains_on_it_again():
    assert bench_fleet.round_rows(SHARD, 1, 128) != bench_fleet.round_rows(SHARD, 2, 128)


def test_a_large_shard_gives_the_next_rows_each_round():
    shard = [(f"row {i}", "fresh") for i in range(300)]
    assert bench_fleet.round_rows(shard, 0, 128) == shard[:128] and bench_fleet.round_rows(shard, 1, 128) == shard[128:256]


def test_the_earlier_draw_pads_a_small_shard_with_copies_of_itself():
    assert len(bench_fleet.round_rows(SHARD, 0, 128, pad=True)) == 128
