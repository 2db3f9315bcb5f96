"""`edgepeft demo --task images` and `--task speech`, reduced: a real hub and two device agents training on new
files of their own (PNGs and WAVs with a label .csv, as a device keeps them); the fleet adapter beats the base.

The demo reuses a bundle it finds in its work folder, so a tiny bundle stands in for the real model's export:
the tiny CNN over real Fashion-MNIST images, and the tiny keyword spotter over tone "words" whose pitch each
device's "voice" shifts (tests/tiny_kws.py) instead of espeak-ng speech.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cli_helpers import run_cli
from conftest import built_once, shared_root


@pytest.fixture(scope="session")
def fashion_cnn_bundle(tmp_path_factory):
    """The tiny CNN exported with Fashion-MNIST's ten labels (LoRA + BN + a fresh head)."""
    from tiny_cnn import export_tiny

    from edgepeft.demo.assets import FASHION_LABELS

    return built_once(shared_root(tmp_path_factory, "demo") / "fashion-cnn.bundle",
                      lambda out: export_tiny(out, "int8", labels=FASHION_LABELS))


def stages(path) -> dict[str, float]:
    return {s["stage"].split(" (")[0]: s["accuracy"] for s in json.loads(path.read_text())["stages"]}


def test_the_images_demo_fleet_adapter_beats_the_base_model(fashion_cnn_bundle, tmp_path, capsys):
    work = tmp_path / "demo"
    work.mkdir()
    shutil.copytree(fashion_cnn_bundle, work / "effnet-lite0-int8.bundle")
    r = run_cli(capsys, "demo", "--task", "images", "--workdir", work, "--devices", "2", "--rounds", "1",
                "--per-device", "400", "--eval-rows", "300", "--epochs", "4", "--lr", "0.1",  # a random tiny CNN needs it
                "--json-out", tmp_path / "demo.json")
    assert r.code == 0, r.err + r.out
    print(r.out)
    s = stages(tmp_path / "demo.json")
    assert "(pulled by all: True)" in r.out
    assert sorted((work / "device-1" / "data").glob("round1/*.png")) and (work / "device-1" / "data" / "round1.csv").is_file()
    assert s["round 1 fleet version v1"] >= s["base"] + 0.10, s
    assert all(s[f"round 1 device-{i}"] >= s["base"] + 0.10 for i in (1, 2)), s


def tone_voice(d) -> np.ndarray:
    """A tiny-KWS "word" spoken in a "voice": the word's tone, shifted by the voice's pitch factor."""
    from tiny_kws import PITCH, SPEC

    rng = np.random.default_rng(d.seed)
    t = np.arange(SPEC.samples) / SPEC.sample_rate
    f = PITCH[d.word] * {"low": 0.8, "high": 1.25}[d.voice.split("+")[0]] * rng.uniform(0.95, 1.05)
    x = rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 0.05, SPEC.samples)
    return np.clip(x * 32767, -32768, 32767).astype(np.int16)


def test_the_speech_demo_fleet_adapter_beats_the_base_model(kws_bundle, tmp_path):
    from tiny_kws import WORDS

    from edgepeft.demo.run import DemoConfig, run_demo
    from edgepeft.demo.speech import SpeechTask

    work = tmp_path / "demo"
    work.mkdir()
    shutil.copytree(kws_bundle, work / "kws-int8.bundle")
    lines: list[str] = []
    task = SpeechTask(words=WORDS, synth=tone_voice, device_voices=("low+a", "high+b"))
    res = run_demo(DemoConfig(workdir=work, devices=2, rounds=1, per_device=60, eval_rows=120, epochs=8), say=lines.append,
                   task=task)
    print("\n".join(lines))
    s = {st["stage"].split(" (")[0]: st["accuracy"] for st in res["stages"]}
    assert any("(pulled by all: True)" in line for line in lines)
    assert (work / "device-2" / "data" / "round1.csv").read_text().startswith("audio,label\n")
    assert s["round 1 fleet version v1"] >= s["base"] + 0.15, s
