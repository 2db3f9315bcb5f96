"""A fleet device's run with --optimizer sgd --momentum --prox: torch SGD with momentum on the loss plus FedProx's term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_reference
from cli_helpers import error_lines, run_cli
from conftest import random_delta
from edgepeft.delta import Delta, delta_from_init
from edgepeft.runtime.data import load_dataset
from edgepeft.runtime.text import load_tokenizer
from edgepeft.runtime.trainer import TrainConfig, Trainer
from synthetic_tasks import word_group_rows, write_jsonl

MU, LR, STEPS = 4.0, 0.5, 4


@pytest.fixture(scope="module")
def one_label(bundles, tmp_path_factory):
    """(fp32 tiny bert bundle, a dataset of 8 rows all of label 0: the device a fleet's label skew makes)."""
    b = bundles("bert")
    rows = [{**r, "label": 0} for r in word_group_rows(8, 5)]
    path = write_jsonl(tmp_path_factory.mktemp("one-label") / "train.jsonl", rows)
    return b, load_dataset(path, b.manifest, load_tokenizer(b))


def torch_fedprox(model_dir, bundle, data, start, mu: float) -> dict[str, np.ndarray]:
    """What torch SGD (momentum 0.9) makes of ``start`` in full-batch steps on cross-entropy + mu/2 ||w - w0||^2."""
    ref, params = torch_reference.with_deltas(torch_reference.load_hf(model_dir, bundle), bundle, start.tensors)
    before = {k: p.detach().clone() for k, p in params.items()}
    batch = data.batch(np.arange(len(data)), bundle.manifest.max_length)
    opt = torch.optim.SGD(list(params.values()), lr=LR, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        out = ref(input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"])).logits
        prox = sum(((p - before[k]) ** 2).sum() for k, p in params.items())
        (F.cross_entropy(out, torch.from_numpy(batch["labels"])) + mu / 2 * prox).backward()
        opt.step()
    return {k: (p.detach() - before[k]).numpy() for k, p in params.items()}


def test_sgd_momentum_prox_training_matches_torch_fedprox(one_label, model_dirs):
    b, data = one_label
    start = Delta(random_delta(b.manifest, seed=3).tensors, delta_from_init(b.manifest, 3).meta)
    config = TrainConfig(epochs=STEPS, batch_size=len(data), lr=LR, optimizer="sgd", momentum=0.9, prox=MU, weight_decay=0.0,
                         max_grad_norm=0.0, schedule="constant", checkpoint_every=0)
    ours = Trainer(b, data, config, start=start).fit().delta.tensors
    want = torch_fedprox(model_dirs("bert"), b, data, start, MU)
    free = torch_fedprox(model_dirs("bert"), b, data, start, 0.0)  # without the pull: the test can tell them apart
    moved = {k: ours[k] - start.tensors[k] for k in want}
    err = max(float(np.abs(moved[k] - want[k]).max()) for k in want)
    gap = max(float(np.abs(moved[k] - free[k]).max()) for k in want)
    assert err < 2e-5 and gap > 50 * err, (err, gap)


def test_train_help_names_the_fleet_levers(capsys):
    r = run_cli(capsys, "train", "--help")
    assert r.code == 0 and all(opt in r.out for opt in ("--momentum", "--prox", "--adam-eps"))


def test_agent_run_help_points_to_prox_in_the_train_table(capsys):
    r = run_cli(capsys, "agent", "run", "--help")
    assert r.code == 0 and "prox = " in r.out


def test_train_refuses_momentum_with_adamw_in_one_line(tmp_path, capsys):
    r = run_cli(capsys, "train", tmp_path / "bundle", "--data", tmp_path / "d.jsonl", "-o", tmp_path / "out.delta",
                "--momentum", "0.9")
    assert r.code == 1 and error_lines(r) == ["Error: --momentum is SGD's; AdamW's first moment plays its part "
                                              "(use --optimizer sgd)"], r.err
