"""Image bundles on the device: train, eval and infer from image folders and arrays, bad input, and the hub loop."""

from __future__ import annotations

import numpy as np
import pytest

from cli_helpers import error_lines, run_cli
from edgepeft.errors import DataError
from edgepeft.names import LORA_A, LORA_B
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.image_data import load_image_dataset
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.evaluate import evaluate
from edgepeft.runtime.trainer import TrainConfig, Trainer
from tiny_cnn import LABELS, SIZE


def colour_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 12x12 RGB images whose label is the brightest channel: learnable in a few dozen steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(LABELS), n)
    x = rng.integers(0, 110, (n, SIZE[1], SIZE[2], 3))
    x[np.arange(n), :, :, labels] += 120
    return x.astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """train.npy / val.npy with their .labels.npy beside them."""
    d = tmp_path_factory.mktemp("images")
    for name, n, seed in (("train", 240, 0), ("val", 90, 1)):
        x, y = colour_images(n, seed)
        np.save(d / f"{name}.npy", x)
        np.save(d / f"{name}.labels.npy", y)
    return d


@pytest.fixture(scope="module")
def trained(cnn_bundle, arrays):
    bundle = open_bundle(cnn_bundle("int8"))
    train = load_image_dataset(arrays / "train.npy", bundle.manifest)
    val = load_image_dataset(arrays / "val.npy", bundle.manifest)
    result = Trainer(bundle, train, TrainConfig(epochs=3, batch_size=16, lr=1e-2), val=val).fit()
    return bundle, val, result


def test_training_on_images_lifts_validation_accuracy(trained):
    _, _, result = trained
    s = result.summary
    assert s.before["accuracy"] < 0.6 and s.after["accuracy"] >= 0.9


def test_the_trained_delta_evaluates_the_same_through_the_inference_graph(trained):
    bundle, val, result = trained
    assert evaluate(Predictor(bundle), val, [result.delta])["accuracy"] == result.summary.after["accuracy"]


def test_data_parallel_runs_train_the_delta_of_one_run(cnn_bundle, arrays):
    # BatchNorm statistics are frozen, so the examples of a batch are independent and its halves' gradients sum exactly
    bundle = open_bundle(cnn_bundle("int8"))
    train = load_image_dataset(arrays / "train.npy", bundle.manifest)
    cfg = dict(max_steps=5, batch_size=16, lr=1e-2)
    one = Trainer(bundle, train, TrainConfig(**cfg, data_parallel=1)).fit().delta
    two = Trainer(bundle, train, TrainConfig(**cfg, data_parallel=2)).fit().delta
    for k in one.tensors:
        np.testing.assert_allclose(two.tensors[k], one.tensors[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_a_budgeted_run_never_holds_two_evaluation_sessions_at_once(cnn_bundle, arrays, monkeypatch):
    # the planned evaluation session replaces the lean one built before the plan; both at once are outside the budget
    import weakref
    from edgepeft.runtime import memory, trainer

    alive, most = weakref.WeakSet(), []

    class Counted(Predictor):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            alive.add(self)
            most.append(len(alive))

    monkeypatch.setattr(trainer, "Predictor", Counted)
    bundle = open_bundle(cnn_bundle("int8"))
    train = load_image_dataset(arrays / "train.npy", bundle.manifest)
    val = load_image_dataset(arrays / "val.npy", bundle.manifest)
    r = Trainer(bundle, train, TrainConfig(max_steps=2, batch_size=16, memory_budget_mb=memory.rss_mb() + 500), val=val).fit()
    assert r.summary.memory.session.arena_cap_mb > 0  # the capped arena's path, which builds the planned session
    assert len(most) == 2 and max(most) == 1


def test_cli_trains_evaluates_and_infers_on_an_image_folder(cnn_bundle, tmp_path, capsys):
    from PIL import Image

    x, y = colour_images(60, 2)
    for i, (img, label) in enumerate(zip(x, y)):
        (tmp_path / "data" / LABELS[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "data" / LABELS[label] / f"{i}.png")
    bundle = str(cnn_bundle("int8"))
    delta = tmp_path / "d.delta"
    r = run_cli(capsys, "train", bundle, "--data", tmp_path / "data", "--epochs", "2", "--batch-size", "8", "--lr", "1e-2",
                "--flip", "--crop-pad", "1", "-o", delta, "-q")
    assert r.code == 0 and delta.is_file(), r.err
    r = run_cli(capsys, "eval", bundle, "--data", tmp_path / "data", "--delta", delta)
    assert r.code == 0 and "examples    60" in r.out, r.err
    one = next((tmp_path / "data" / "b").iterdir())
    r = run_cli(capsys, "infer", bundle, one, "--delta", delta)
    assert r.code == 0 and r.out.split("\t")[0] in LABELS and r.out.strip().endswith(str(one)), r.err


def test_an_image_folder_with_one_class_is_refused_naming_it(cnn_bundle, tmp_path, capsys):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.fromarray(colour_images(1, 0)[0][0]).save(tmp_path / "a" / "0.png")
    r = run_cli(capsys, "train", cnn_bundle("int8"), "--data", tmp_path, "-o", tmp_path / "d")
    assert r.code != 0 and len(error_lines(r)) == 1 and f"{tmp_path}: every image is labelled 'a'" in error_lines(r)[0]
    assert not (tmp_path / "d").exists()


def test_an_undecodable_image_in_a_folder_is_refused_naming_the_file(cnn_bundle, tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
    Image.fromarray(colour_images(1, 0)[0][0]).save(tmp_path / "a" / "0.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match=r"broken\.jpg: not a decodable image"):
        load_image_dataset(tmp_path, open_bundle(cnn_bundle("int8")).manifest)


def test_image_deltas_travel_through_the_hub_and_aggregate_in_delta_w_space(trained, tmp_path):
    from conftest import HubThread
    from edgepeft.delta.format import delta_bytes, replace_meta
    from edgepeft.devices.client import HubClient
    from edgepeft.delta.transport import unpack
    from edgepeft.hub import aggregate as agg
    from edgepeft.hub.app import create_app
    from edgepeft.hub.backends import open_store

    bundle, val, result = trained
    store = open_store(str(tmp_path / "store"))
    files = {p.name: p.read_bytes() for p in bundle.path.iterdir() if p.is_file()}
    rec, _ = store.add_bundle(files["manifest.json"].decode(), files)
    store.create_fleet("f", rec.fingerprint)
    tokens = {d: store.add_device("f", d) for d in ("d1", "d2")}
    second = replace_meta(result.delta, creator="d2", samples=3 * result.delta.meta.samples)
    second.tensors.update({k: v * np.float32(0.5) for k, v in result.delta.tensors.items() if k.endswith(LORA_B)})
    server = HubThread(create_app(store, admin_token="admin-token-for-tests-0123456789", policy_interval_s=0))
    try:
        for device, d in (("d1", replace_meta(result.delta, creator="d1")), ("d2", second)):
            with HubClient(server.url, tokens[device], retries=0) as c:
                c.push(delta_bytes(d))
        agg.aggregate(store, "f")
        with HubClient(server.url, tokens["d1"], retries=0) as c:
            _, packed = c.download_version("f", result.delta.meta.adapter)
    finally:
        server.stop()
        store.close()
    fleet = unpack(packed, "packed")
    w1, w2 = 0.25, 0.75
    for s in bundle.manifest.slots:
        if s.kind == LORA_A:  # the mean of the two conv updates s*B@A (flattened kernels), re-factored to rank r
            b = s.name[:-len(LORA_A)] + LORA_B
            dw = lambda d: d.tensors[b].astype(np.float64) @ d.tensors[s.name].astype(np.float64)  # noqa: E731
            want = w1 * dw(result.delta) + w2 * dw(second)
            np.testing.assert_allclose(dw(fleet), want, atol=2e-2 * np.abs(want).max() + 1e-6)
    assert evaluate(Predictor(bundle), val, [unpack(packed, manifest=bundle.manifest)])["accuracy"] > 0.5
