"""Audio bundles on the device: the KWS CNN's train step equals torch + PEFT, training on WAV folders, the CLI, bad files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from cli_helpers import error_lines, run_cli
from conftest import random_delta
from edgepeft.errors import DataError
from edgepeft.names import BN_SCALE, INPUT_FEATURES, LABELS, LOSS, grad_name
from edgepeft.runtime.audio_data import load_audio_dataset
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.evaluate import evaluate
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.trainer import TrainConfig, Trainer
from test_vision_export import reference
from tiny_kws import SPEC, WORDS, tiny_kws, word_folder, write_wav


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("words")
    return word_folder(d / "train", 40, seed=0), word_folder(d / "val", 20, seed=1)


def _assert_step_matches_torch(bundle, delta, b, model) -> None:
    """The train graph's loss and every slot's gradient on batch ``b`` equal torch + PEFT's on the same weights."""
    names = [s.name for s in bundle.manifest.slots]
    out = bundle.session("train").run([LOSS, *map(grad_name, names)], {**b, **delta.tensors})
    peft, theirs = reference(bundle, delta.tensors, model)
    loss = nn.functional.cross_entropy(peft(torch.from_numpy(b[INPUT_FEATURES])), torch.from_numpy(b[LABELS]))
    grads = torch.autograd.grad(loss, [theirs[n] for n in names])
    assert abs(float(out[0]) - loss.item()) < 1e-5
    for n, ours, g in zip(names, out[1:], grads):
        g = g.reshape(ours.shape).numpy()
        assert np.abs(ours - g).max() <= 1e-4 * max(1.0, np.abs(g).max()), n


def test_train_step_loss_and_gradients_match_torch_peft_on_the_same_weights(kws_bundle, folders):
    bundle = open_bundle(kws_bundle)
    delta = random_delta(bundle.manifest, seed=3, magnitude=0.2)
    b = load_audio_dataset(folders[0], bundle.manifest).batch([0, 45, 90, 100])  # real features, every word
    _assert_step_matches_torch(bundle, delta, b, tiny_kws())


def test_bn_head_train_step_matches_torch_with_scales_of_every_sign(kws_bn_bundle, folders):
    """BN + head: the norms' gradients taken on the pooled maps (exporters/pool_grad.AffineMaxPool; the first block by
    window_pick, no index search), with γ + ds positive, negative and exactly zero in every block."""
    bundle = open_bundle(kws_bn_bundle)
    delta = random_delta(bundle.manifest, seed=4, magnitude=0.2)
    model = tiny_kws()
    for s in bundle.manifest.slots:
        if s.kind == BN_SCALE:  # channel 0: γ + ds = 0; channel 1: negative
            gamma = model.get_submodule(s.module).weight.detach().numpy()
            delta.tensors[s.name][:2] = [-gamma[0], -gamma[1] - 0.7]
    b = load_audio_dataset(folders[0], bundle.manifest).batch([0, 45, 90, 100])
    _assert_step_matches_torch(bundle, delta, b, model)
    ops = {n.op_type for n in onnx.load(bundle.graph_path("train"), load_external_data=False).graph.node}
    assert not {"MaxUnpool", "Resize"} & ops, ops  # the tiny CNN pools once, after its first block: no index search


@pytest.fixture(scope="module")
def trained(kws_bundle, folders):
    bundle = open_bundle(kws_bundle)
    train, val = (load_audio_dataset(f, bundle.manifest) for f in folders)
    return bundle, val, Trainer(bundle, train, TrainConfig(epochs=4, batch_size=16, lr=2e-2), val=val).fit()


def test_training_on_a_word_folder_lifts_validation_accuracy(trained):
    bundle, val, result = trained
    s = result.summary
    assert s.after["accuracy"] >= 0.95 and s.after["accuracy"] - s.before["accuracy"] >= 0.2, (s.before, s.after)
    assert evaluate(Predictor(bundle), val, [result.delta])["accuracy"] == result.summary.after["accuracy"]


def test_an_audio_delta_travels_packed_like_any_delta(trained):
    from edgepeft.delta.transport import pack, unpack

    bundle, val, result = trained
    back = unpack(pack(result.delta), manifest=bundle.manifest)
    # int8 on the wire: the accuracy may move by a clip, not more
    assert abs(evaluate(Predictor(bundle), val, [back])["accuracy"] - result.summary.after["accuracy"]) <= 1 / len(val) + 1e-9


def test_cli_trains_evaluates_and_infers_on_wav_files_and_label_files(kws_bundle, folders, tmp_path, capsys):
    train, val = folders
    (tmp_path / "val.csv").write_text("audio,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(val.rglob("*.wav"))))
    delta = tmp_path / "d.delta"
    r = run_cli(capsys, "train", kws_bundle, "--data", train, "--val", tmp_path / "val.csv", "--epochs", "2",
                "--batch-size", "16", "--lr", "2e-2", "-o", delta, "-q")
    assert r.code == 0 and delta.is_file(), r.err
    r = run_cli(capsys, "eval", kws_bundle, "--data", tmp_path / "val.csv", "--delta", delta)
    assert r.code == 0 and f"examples    {20 * len(WORDS)}" in r.out, r.err
    one = val / "high" / "0.wav"
    r = run_cli(capsys, "infer", kws_bundle, one, "--delta", delta)
    assert r.code == 0 and r.out.split("\t")[0] in WORDS and r.out.strip().endswith(str(one)), r.err


def test_a_bad_wav_in_a_word_folder_is_refused_in_one_line_naming_the_file(kws_bundle, tmp_path, capsys):
    data = word_folder(tmp_path / "data", 2, seed=2)
    bad = write_wav(data / "mid" / "phone.wav", np.zeros(800, np.int16), rate=44100)
    r = run_cli(capsys, "train", kws_bundle, "--data", data, "-o", tmp_path / "d")
    assert r.code != 0 and len(error_lines(r)) == 1, r.err
    assert f"{bad}: 44100 Hz with 1 channel(s); the bundle takes 16000 Hz mono" in error_lines(r)[0]
    assert not (tmp_path / "d").exists()


def test_an_audio_folder_with_one_word_is_refused_naming_it(kws_bundle, tmp_path):
    data = word_folder(tmp_path / "data", 2, seed=3)
    for w in WORDS[1:]:
        for f in (data / w).iterdir():
            f.unlink()
        (data / w).rmdir()
    with pytest.raises(DataError, match=f"every clip is labelled '{WORDS[0]}'"):
        load_audio_dataset(data, open_bundle(kws_bundle).manifest)


def test_the_bundle_records_the_features_the_device_computes(kws_bundle):
    from edgepeft.runtime.audio import AudioSpec

    m = open_bundle(kws_bundle).manifest
    assert m.task == "audio-classification" and AudioSpec.of(m) == SPEC and m.labels == WORDS


def test_export_audio_refuses_an_unknown_model_and_weights_without_its_metadata_in_one_line(tmp_path, capsys):
    from safetensors.numpy import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"fc.weight": np.zeros((3, 8), np.float32)}, str(plain))
    r = run_cli(capsys, "export", "--audio", "wav2vec", "--weights", plain, "-o", tmp_path / "b")
    assert r.code != 0 and "--audio 'wav2vec': unknown model; known: kws-cnn, crepe-tiny" in error_lines(r)[0], r.err
    r = run_cli(capsys, "export", "--audio", "kws-cnn", "--weights", plain, "-o", tmp_path / "b")
    assert r.code != 0 and len(error_lines(r)) == 1 and f"--weights {plain}: not kws-cnn weights" in error_lines(r)[0], r.err
    assert not (tmp_path / "b").exists()
