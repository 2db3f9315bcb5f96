"""--logit-adjust: the device trains on logits shifted by τ·log of its label prior, as torch does with the shift written out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_reference
from cli_helpers import error_lines, run_cli
from conftest import random_delta
from edgepeft.delta import Delta, delta_from_init
from edgepeft.errors import TrainError
from edgepeft.runtime.data import load_dataset
from edgepeft.runtime.logit_adjust import bias_shift, label_prior
from edgepeft.runtime.text import load_tokenizer
from edgepeft.runtime.trainer import TrainConfig, Trainer
from synthetic_tasks import word_group_rows, write_jsonl

LABELS = [0] * 6 + [2] * 2  # a skewed device: label 1 never seen


@pytest.fixture(scope="module")
def skewed(bundles, tmp_path_factory):
    """(fp32 tiny bert bundle, a dataset of 8 rows labelled 0 and 2 only)."""
    b = bundles("bert")
    rows = [{**r, "label": y} for r, y in zip(word_group_rows(len(LABELS), 5), LABELS)]
    path = write_jsonl(tmp_path_factory.mktemp("skewed") / "train.jsonl", rows)
    return b, load_dataset(path, b.manifest, load_tokenizer(b))


def test_label_prior_keeps_an_unseen_label_finite():
    assert label_prior(np.array([0, 0, 0, 2]), 3) == pytest.approx([4 / 7, 1 / 7, 2 / 7])


def test_label_prior_of_tagged_tokens_skips_the_unlabelled_positions():
    tags = np.array([[0, 0, -100], [2, -100, -100]])  # token classification: (rows, tokens), IGNORED_LABEL unlabelled
    assert label_prior(tags, 3) == pytest.approx([3 / 6, 1 / 6, 2 / 6])


def torch_steps(model_dir, bundle, data, start, steps: int, lr: float, tau: float) -> dict[str, np.ndarray]:
    """What torch AdamW makes of ``start`` in full-batch steps on cross-entropy of logits + τ·log(prior)."""
    ref, params = torch_reference.with_deltas(torch_reference.load_hf(model_dir, bundle), bundle, start.tensors)
    before = {k: p.detach().clone() for k, p in params.items()}
    batch = data.batch(np.arange(len(data)), bundle.manifest.max_length)
    shift = torch.from_numpy(np.log(label_prior(batch["labels"], len(bundle.manifest.labels))) * tau).float()
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        out = ref(input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"])).logits
        F.cross_entropy(out + shift, torch.from_numpy(batch["labels"])).backward()
        opt.step()
    return {k: (p.detach() - before[k]).numpy() for k, p in params.items()}


@pytest.mark.parametrize("tau", [1.0, 0.0], ids=["balanced-softmax", "off"])
def test_training_matches_torch_adamw_on_the_adjusted_loss(tau, skewed, model_dirs):
    b, data = skewed
    start = Delta(random_delta(b.manifest, seed=3).tensors, delta_from_init(b.manifest, 3).meta)
    config = TrainConfig(epochs=3, batch_size=len(data), lr=1e-2, weight_decay=0.0, max_grad_norm=0.0, schedule="constant",
                         logit_adjust=tau, checkpoint_every=0)
    ours = Trainer(b, data, config, start=start).fit().delta.tensors
    want = torch_steps(model_dirs("bert"), b, data, start, 3, 1e-2, tau)
    other = torch_steps(model_dirs("bert"), b, data, start, 3, 1e-2, 1.0 - tau)  # the other loss: the test can tell them apart
    moved = {k: ours[k] - start.tensors[k] for k in want}
    err = max(float(np.abs(moved[k] - want[k]).max()) for k in want)
    gap = max(float(np.abs(moved[k] - other[k]).max()) for k in want)
    assert err < 2e-5 and gap > 50 * err, (err, gap)


def test_the_delta_keeps_the_unshifted_head_bias(skewed):
    b, data = skewed
    shift = bias_shift(b.manifest, data.labels, 1.0)
    (slot,) = shift
    config = TrainConfig(max_steps=1, batch_size=8, lr=1e-12, logit_adjust=1.0, checkpoint_every=0)
    out = Trainer(b, data, config, start=delta_from_init(b.manifest, 0)).fit().delta
    assert np.abs(out.tensors[slot]).max() < 1e-6  # a zero bias moved by lr 1e-12, not by the shift of ~1


def test_train_refuses_logit_adjust_with_balanced_draws_in_one_line(tmp_path, capsys):
    r = run_cli(capsys, "train", tmp_path / "bundle", "--data", tmp_path / "d.jsonl", "-o", tmp_path / "out.delta",
                "--logit-adjust", "1", "--balance-labels")
    assert r.code == 1 and error_lines(r) == ["Error: --logit-adjust and --balance-labels both correct for skewed labels; "
                                              "choose one"], r.err


def test_logit_adjust_needs_a_label_per_example(skewed):
    with pytest.raises(TrainError, match="label per example"):
        bias_shift(skewed[0].manifest, None, 1.0)
