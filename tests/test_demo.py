"""`edgepeft demo`, reduced: a real hub, two device agents training on their own Rotten Tomatoes shards,
one aggregation; the fleet adapter every device pulls is clearly better than the base model."""

from __future__ import annotations

import json
import shutil

import pytest

from cli_helpers import run_cli


@pytest.mark.slow
def test_the_demo_fleet_adapter_beats_the_base_model(minilm_bundle, tmp_path, capsys):
    work = tmp_path / "demo"
    work.mkdir()
    # the session's real bundle stands in for the demo's own export (the demo reuses a bundle it finds)
    shutil.copytree(minilm_bundle("int8"), work / "minilm-int8.bundle")
    r = run_cli(capsys, "demo", "--workdir", work, "--devices", "2", "--rounds", "1", "--per-device", "600",
                "--eval-rows", "300", "--epochs", "2", "--json-out", tmp_path / "demo.json")
    assert r.code == 0, r.err + r.out
    stages = {s["stage"].split(" (")[0]: s["accuracy"] for s in json.loads((tmp_path / "demo.json").read_text())["stages"]}
    print(r.out)
    base, fleet = stages["base"], stages["round 1 fleet version v1"]
    assert "(pulled by all: True)" in r.out
    assert fleet >= base + 0.10 and fleet >= 0.65, stages
    assert all(stages[f"round 1 device-{i}"] >= base + 0.10 for i in (1, 2)), stages
