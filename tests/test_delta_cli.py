"""``edgepeft delta ...`` through click, and one real process for the one-line error and exit status."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgepeft.cli import cli
from edgepeft.delta import Delta, DeltaMeta, load_delta, save_delta
from edgepeft.delta.format import delta_bytes
from edgepeft.errors import BundleError, DeltaError
from edgepeft.manifest import Manifest, Slot, write_manifest

FP = "9" * 64
COMMANDS = ["inspect", "diff", "pack", "unpack", "merge", "to-peft", "from-peft", "to-ort-adapter"]


def make_manifest(head: bool = False) -> Manifest:
    slots = [
        Slot("enc.q.lora_A", "lora_A", "enc.q", (4, 16), rank=4, alpha=8.0),
        Slot("enc.q.lora_B", "lora_B", "enc.q", (16, 4), rank=4, alpha=8.0),
        Slot("enc.q.bias", "bias", "enc.q", (16,)),
    ]
    if head:
        slots.append(Slot("head.weight", "weight", "head", (2, 16)))
    return Manifest(
        fingerprint=FP, source="tiny", architecture="Tiny", model_type="bert", task="sequence-classification",
        method="lora+bitfit", quantization="none", max_length=16, vocab_size=100, pad_token_id=0, slots=tuple(slots), graphs={},
    )


def make_delta(seed: int = 0, head: bool = False, samples: int = 5) -> Delta:
    rng = np.random.default_rng(seed)
    t = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in make_manifest(head).slots}
    return Delta(t, DeltaMeta(base_fingerprint=FP, method="lora+bitfit", rank=4, alpha=8.0, samples=samples, creator="dev-7"))


@pytest.fixture
def work(tmp_path, monkeypatch):
    """tmp_path as cwd with a bundle (manifest only), a head bundle, and two delta files."""
    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path / "bundle", make_manifest())
    write_manifest(tmp_path / "hbundle", make_manifest(head=True))
    save_delta(tmp_path / "a.delta", make_delta(0))
    save_delta(tmp_path / "b.delta", make_delta(1))
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(cli, ["delta", *args])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    r = run(command, "--help")
    assert r.exit_code == 0 and "Usage:" in r.output


def test_group_lists_every_command():
    r = run("--help")
    assert all(c in r.output for c in COMMANDS)


def test_inspect_shows_meta_slots_sizes_and_pack_error(work):
    r = run("inspect", "a.delta", "--bundle", "bundle")
    assert r.exit_code == 0, r.output
    for text in ("rank 4  alpha 8  scale 2", "samples     5  creator dev-7", "enc.q.lora_A", "4x16", "raw ", "packed ", "x smaller", "max |x - x'|"):
        assert text in r.output
    line = next(l for l in r.output.splitlines() if l.startswith("pack error"))
    actual, bound = float(line.split("= ")[1].split()[0]), float(line.split("(bound ")[1].split(":")[0])
    d = load_delta(work / "a.delta")
    assert actual <= bound and bound == pytest.approx(max(np.abs(t).max() for t in d.tensors.values()) / 254, rel=5e-3)


def test_inspect_refuses_delta_for_another_bundle(work):
    write_manifest(work / "other", dataclasses.replace(make_manifest(), fingerprint="1" * 64))
    r = run("inspect", "a.delta", "--bundle", "other")
    assert isinstance(r.exception, DeltaError) and "delta is for base" in str(r.exception)


def test_inspect_refuses_missing_bundle(work):
    r = run("inspect", "a.delta", "--bundle", "nope")
    assert isinstance(r.exception, BundleError)


def test_diff_prints_a_row_per_slot_and_update(work):
    r = run("diff", "a.delta", "b.delta")
    assert r.exit_code == 0, r.output
    assert "enc.q.bias" in r.output and "enc.q:dW" in r.output


def test_pack_then_unpack_gives_a_close_delta(work):
    assert run("pack", "a.delta", "-o", "a.packed").exit_code == 0
    assert (work / "a.packed").stat().st_size < (work / "a.delta").stat().st_size
    r = run("unpack", "a.packed", "-o", "back.delta", "--bundle", "bundle")
    assert r.exit_code == 0, r.output
    a, back = load_delta(work / "a.delta"), load_delta(work / "back.delta")
    assert back.meta == a.meta
    assert np.abs(back.tensors["enc.q.lora_A"] - a.tensors["enc.q.lora_A"]).max() < np.abs(a.tensors["enc.q.lora_A"]).max() / 200


def test_inspect_reads_packed_files(work):
    run("pack", "a.delta", "-o", "a.packed")
    r = run("inspect", "a.packed")
    assert r.exit_code == 0 and "enc.q.lora_B" in r.output


def test_merge_writes_delta_and_prints_module_errors(work):
    r = run("merge", "a.delta", "b.delta", "-o", "m.delta", "--weights", "1,3", "--rank", "2")
    assert r.exit_code == 0, r.output
    assert "merged 2 deltas" in r.output and "enc.q" in r.output and "rel. error" in r.output
    m = load_delta(work / "m.delta", make_manifest())
    assert m.meta.rank == 2 and m.meta.samples == 10


def test_merge_refuses_wrong_weight_count(work):
    r = run("merge", "a.delta", "b.delta", "-o", "m.delta", "--weights", "1")
    assert r.exit_code == 2 and "2 deltas" in r.output


def test_to_peft_then_from_peft_round_trips(work):
    r = run("to-peft", "a.delta", "--bundle", "bundle", "-o", "peft_out")
    assert r.exit_code == 0, r.output
    assert (work / "peft_out" / "adapter_config.json").is_file()
    r = run("from-peft", "peft_out", "--bundle", "bundle", "-o", "back.delta")
    assert r.exit_code == 0, r.output
    a, back = load_delta(work / "a.delta"), load_delta(work / "back.delta", make_manifest())
    for k in a.tensors:
        np.testing.assert_allclose(back.tensors[k], a.tensors[k], rtol=1e-5, atol=1e-6)


def test_to_peft_refuses_head_slots_with_a_clear_message(work):
    save_delta(work / "h.delta", make_delta(head=True))
    r = run("to-peft", "h.delta", "--bundle", "hbundle", "-o", "peft_out")
    assert isinstance(r.exception, DeltaError)
    assert "'head.weight' is stored whole by PEFT" in str(r.exception) and "weights file" in str(r.exception)
    assert not (work / "peft_out").exists()


def test_to_ort_adapter_writes_a_file(work):
    r = run("to-ort-adapter", "a.delta", "-o", "a.onnx_adapter")
    assert r.exit_code == 0, r.output
    assert (work / "a.onnx_adapter").stat().st_size > 0


def test_installed_command_prints_one_line_error_and_fails(tmp_path):
    d = make_delta()
    d.tensors["enc.q.bias"][3] = np.nan
    (tmp_path / "bad.delta").write_bytes(delta_bytes(d))
    exe = Path(sys.executable).with_name("edgepeft")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgepeft.cli"]
    p = subprocess.run([*cmd, "delta", "inspect", "bad.delta"], cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == ["Error: bad.delta: tensor 'enc.q.bias' has 1 non-finite value(s) (NaN or Inf)"]
    assert p.stdout == ""


def test_delta_package_and_command_never_import_torch():
    code = (
        "import sys, edgepeft.delta, edgepeft.delta.peft_format, edgepeft.delta.ort_adapter, edgepeft.commands.delta; "
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; sys.exit(str(bad) if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


# ---- hostile files at the command line: each one line on stderr, exit status 1 ---------------------

def _split(data: bytes) -> tuple[dict, bytes]:
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    import json
    import struct

    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _hostile(kind: str) -> bytes:
    import struct

    good = delta_bytes(make_delta())
    header, body = _split(good)
    if kind == "random bytes":
        return np.random.default_rng(0).bytes(1000)
    if kind == "truncated":
        return good[: len(good) - 100]
    if kind == "huge header length":
        return struct.pack("<Q", 2**62) + good[8:]
    if kind == "huge tensor claim":
        header["enc.q.lora_A"]["shape"] = [2**20, 2**20]
        return _join(header, body)
    if kind == "path separator name":
        header["../enc.q.bias"] = header.pop("enc.q.bias")
        return _join(header, body)
    d = make_delta()
    if kind == "another base":
        d = Delta(d.tensors, dataclasses.replace(d.meta, base_fingerprint="1" * 64))
    elif kind == "wrong shape":
        d.tensors["enc.q.bias"] = np.zeros(15, np.float32)
    elif kind == "nan":
        d.tensors["enc.q.lora_B"][0, 0] = np.nan
    elif kind == "extra slot":
        d.tensors["enc.k.bias"] = np.zeros(16, np.float32)
    elif kind == "missing slot":
        del d.tensors["enc.q.bias"]
    return delta_bytes(d)


HOSTILE = ["random bytes", "truncated", "huge header length", "huge tensor claim", "path separator name", "another base",
           "wrong shape", "nan", "extra slot", "missing slot"]


FITS_BUNDLE = ("another base", "wrong shape", "extra slot", "missing slot")  # wrong only against a bundle
CASES = [(k, "inspect") for k in HOSTILE] + [(k, c) for k in HOSTILE if k not in FITS_BUNDLE for c in ("pack", "to-ort-adapter")]


@pytest.mark.parametrize("kind,command", CASES)
def test_hostile_file_is_refused_with_one_line(work, capsys, kind, command):
    from edgepeft.cli import main

    (work / "bad.delta").write_bytes(_hostile(kind))
    args = {"inspect": ["--bundle", "bundle"], "pack": ["-o", "out.bin"], "to-ort-adapter": ["-o", "out.bin"]}[command]
    with pytest.raises(SystemExit) as e:
        main(["delta", command, "bad.delta", *args])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("Error: bad.delta: "), err
    assert not (work / "out.bin").exists()
