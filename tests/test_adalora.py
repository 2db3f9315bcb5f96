"""AdaLoRA's rank budget beside PEFT's: the same ranks survive the same steps, the pruned delta is PEFT's format.

Outputs, gradients (the orthogonality term included), mixes, the hub's mean and the unpruned PEFT round trip are rows
of tests/test_methods_table.py; this file covers what only AdaLoRA has.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.tuners.adalora.layer import RankAllocator

import torch_reference
from cli_helpers import error_lines, run_cli
from edgepeft.delta import delta_from_init, load_delta
from edgepeft.delta.peft_format import from_peft, to_peft
from edgepeft.methods.adalora import AdaLoraConfig
from edgepeft.methods.adalora_budget import RankBudget
from edgepeft.names import ADA_A, ADA_B, ADA_E, ATTENTION_MASK, INPUT_IDS, LABELS, grad_name, slot_name
from edgepeft.runtime.data import load_dataset
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.optim import AdamW
from edgepeft.runtime.text import load_tokenizer
from edgepeft.runtime.trainer import TrainConfig, Trainer
from edgepeft.runtime.weights import read_frozen
from synthetic_tasks import classification_files
from test_methods_table import batch, rel

OPTIONS = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2}  # the table's bert row: one export serves both files
SCHEDULE = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1)
STEPS = 7


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles("bert", "none", method="adalora", method_config=OPTIONS)


def peft_pattern(rank_pattern: dict) -> dict[str, np.ndarray]:
    """PEFT's rank_pattern ({'<module>.lora_E.default': [bool]}) keyed by module."""
    return {k.split(".lora_E")[0]: np.array(v) for k, v in rank_pattern.items()}


def test_the_budget_keeps_the_ranks_peft_keeps_for_the_same_steps(bundle, model_dirs):
    # Both sides start from the same delta and train on the same batches, each with its own AdamW; after every step
    # PEFT's update_and_allocate and ours see that step's gradients: the gradients and every rank pattern agree.
    m = bundle.manifest
    start = delta_from_init(m, 0)
    params = {k: v.copy() for k, v in start.tensors.items()}
    model, grads_of = torch_reference.with_deltas(torch_reference.load_hf(model_dirs("bert"), bundle), bundle, start.tensors)
    cfg = model.peft_config["default"]
    cfg.init_r, cfg.target_r, cfg.tinit, cfg.tfinal, cfg.deltaT, cfg.total_step = 4, 2, 1, 2, 1, STEPS
    model.base_model.rankallocator = RankAllocator(model.base_model.model, cfg, "default")
    ours, opt = RankBudget(SCHEDULE, list(m.slots), STEPS), AdamW(params, weight_decay=0.0)
    theirs = torch.optim.AdamW(list(grads_of.values()), lr=1e-2, weight_decay=0.0)
    sess = bundle.session("train")
    names = [s.name for s in m.slots]
    patterns = []
    for step in range(STEPS):
        ids, mask, labels = batch(m, 4, 8, seed=step)
        out = sess.run([grad_name(n) for n in names], {INPUT_IDS: ids, ATTENTION_MASK: mask, LABELS: labels, **params})
        grads = dict(zip(names, out))
        _, ref = torch_reference.loss_and_grads(model, grads_of, m.task, ids, mask, labels)
        for n in names:
            assert rel(grads[n], ref[n].reshape(grads[n].shape)) < 1e-4, (step, n)
        opt.step(grads, 1e-2)
        ours.after_step(params, grads, step)
        theirs.step()
        model.base_model.update_and_allocate(step)
        if cfg.rank_pattern:
            want = peft_pattern(cfg.rank_pattern)
            assert {k: v.tolist() for k, v in ours.pattern.items()} == {k: v.tolist() for k, v in want.items()}, step
            patterns.append(sum(int(v.sum()) for v in want.values()))
    assert patterns[-1] == SCHEDULE.target_r * len(ours.modules) and patterns[0] > patterns[-1]  # it did prune
    for s in m.slots:
        if s.kind == ADA_E:  # pruned λ are zero on both sides
            assert rel(params[s.name], grads_of[s.name].detach().numpy().reshape(-1)) < 1e-3, s.name


@pytest.fixture(scope="module")
def trained(bundle, tmp_path_factory):
    train, _ = classification_files(tmp_path_factory.mktemp("ada"), n_train=96, n_val=10)
    data = load_dataset(train, bundle.manifest, load_tokenizer(bundle))
    config = TrainConfig(max_steps=6, batch_size=16, lr=1e-2, checkpoint_every=0)
    return Trainer(bundle, data, config).fit().delta


def test_the_trained_delta_carries_only_the_surviving_ranks(bundle, trained):
    m = bundle.manifest
    modules = sorted({s.module for s in m.slots if s.kind == ADA_E})
    ranks = {mod: trained.tensors[slot_name(mod, ADA_E)].shape[0] for mod in modules}
    assert sum(ranks.values()) == OPTIONS["target_r"] * len(modules)
    for mod, r in ranks.items():
        assert trained.tensors[slot_name(mod, ADA_A)].shape[0] == r and trained.tensors[slot_name(mod, ADA_B)].shape[1] == r
    assert trained.meta.rank == OPTIONS["init_r"]  # PEFT's ranknum: the scale's denominator stays
    assert '"' in trained.meta.extra["adalora_ranks"]


def test_a_pruned_delta_loads_in_peft_with_our_logits_and_comes_back(bundle, trained, model_dirs, tmp_path):
    m = bundle.manifest
    to_peft(trained, m, tmp_path / "peft", base_weights=read_frozen(bundle))
    model = PeftModel.from_pretrained(torch_reference.load_hf(model_dirs("bert"), bundle), tmp_path / "peft").eval()
    ids, mask, _ = batch(m, 2, 7)
    ours = Predictor(bundle).logits(ids, mask, [trained])
    assert rel(ours, torch_reference.logits(model, ids, mask)) < 1e-4
    back = from_peft(tmp_path / "peft", m, base_weights=read_frozen(bundle))
    assert back.meta.rank == trained.meta.rank and back.scale == pytest.approx(trained.scale)
    for k, t in trained.tensors.items():
        assert rel(back.tensors[k], t) < 1e-5, k


def test_a_pruned_delta_trains_on_from_its_kept_ranks(bundle, trained, tmp_path):
    # the pruned triplets come back as zeros (λ, P and Q), which a step leaves at zero
    train, _ = classification_files(tmp_path, n_train=48, n_val=10)
    config = TrainConfig(max_steps=4, batch_size=16, lr=1e-2, checkpoint_every=0)
    more = Trainer(bundle, load_dataset(train, bundle.manifest, load_tokenizer(bundle)), config, start=trained).fit().delta
    assert sum(t.shape[0] for k, t in more.tensors.items() if k.endswith(ADA_E)) == sum(
        t.shape[0] for k, t in trained.tensors.items() if k.endswith(ADA_E))


def test_a_schedule_longer_than_the_run_is_refused_in_one_line_and_nothing_is_written(bundle, tmp_path, capsys):
    train, _ = classification_files(tmp_path, n_train=48, n_val=10)
    run = tmp_path / "run"
    r = run_cli(capsys, "train", bundle.path, "--data", train, "-o", run / "out.delta", "--max-steps", "3",
                "--checkpoint-dir", run / "ckpt")
    assert r.code == 1
    (line,) = error_lines(r)
    assert "adalora.tinit" in line and "--max-steps" in line, line
    assert not run.exists() or not any(run.rglob("*"))
