"""PEFT interop for convolutional bundles against real peft, on the tiny CNN: LoRA on Conv2d is PEFT's
lora.Conv2d, BatchNorm tuning and the fresh head ride as modules_to_save, both directions give PEFT's logits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import random_delta
from tiny_cnn import SIZE, TinyCNN

from edgepeft.delta import Delta, delta_from_init
from edgepeft.delta.peft_format import from_peft, to_peft
from edgepeft.errors import DeltaError
from edgepeft.names import BN_SCALE, LORA_A
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.weights import read_frozen


@pytest.fixture(scope="module")
def bundle(cnn_bundle):
    return open_bundle(cnn_bundle("none"))


def base_model(bundle) -> TinyCNN:
    """The bundle's model in torch: the tiny CNN with the bundle's frozen weights (its fresh head included)."""
    model = TinyCNN(classes=len(bundle.manifest.labels))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in read_frozen(bundle).items()})
    return model.eval()


def a_delta(bundle, seed: int) -> Delta:
    """Non-zero values in every slot (LoRA A and B, BN γ and β, the head)."""
    return Delta(dict(random_delta(bundle.manifest, seed=seed, magnitude=0.2).tensors), delta_from_init(bundle.manifest, 0).meta)


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, *SIZE)).astype(np.float32)


def logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_peft_loads_a_converted_conv_delta_and_computes_the_bundles_logits(bundle, tmp_path):
    delta = a_delta(bundle, seed=5)
    to_peft(delta, bundle.manifest, tmp_path / "adapter", base_weights=read_frozen(bundle))
    theirs = logits(PeftModel.from_pretrained(base_model(bundle), tmp_path / "adapter").eval(), pixels())
    ours = Predictor(bundle).image_logits(pixels(), [delta])
    assert np.abs(ours - theirs).max() < 1e-4


def test_a_conv_delta_survives_the_round_trip_through_peft_form(bundle, tmp_path):
    delta = a_delta(bundle, seed=6)
    base = read_frozen(bundle)
    to_peft(delta, bundle.manifest, tmp_path / "adapter", base_weights=base)
    back = from_peft(tmp_path / "adapter", bundle.manifest, base_weights=base)
    assert set(back.tensors) == set(delta.tensors)
    for name, t in delta.tensors.items():
        np.testing.assert_allclose(back.tensors[name], t, atol=1e-6, err_msg=name)


def test_an_adapter_peft_trained_on_the_cnn_reads_back_with_peft_logits(bundle, tmp_path):
    m = bundle.manifest
    lora = sorted({s.module for s in m.slots if s.kind == LORA_A})
    norms = sorted({s.module for s in m.slots if s.kind == BN_SCALE})
    a0 = next(s for s in m.slots if s.kind == LORA_A)
    model = get_peft_model(base_model(bundle), LoraConfig(r=a0.rank, lora_alpha=a0.alpha, target_modules=lora,
                                                          modules_to_save=[*norms, "fc"]))
    torch.manual_seed(2)
    with torch.no_grad():  # as after training in eval mode: LoRA B, the norms' γ and β and the head moved
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.eval().save_pretrained(tmp_path / "adapter")
    delta = from_peft(tmp_path / "adapter", m, base_weights=read_frozen(bundle))
    assert np.abs(Predictor(bundle).image_logits(pixels(1), [delta]) - logits(model, pixels(1))).max() < 1e-4


def test_peft_batchnorm_statistics_re_estimated_in_train_mode_are_refused(bundle, tmp_path):
    m = bundle.manifest
    norms = sorted({s.module for s in m.slots if s.kind == BN_SCALE})
    a0 = next(s for s in m.slots if s.kind == LORA_A)
    model = get_peft_model(base_model(bundle), LoraConfig(r=a0.rank, lora_alpha=a0.alpha, target_modules=sorted(
        {s.module for s in m.slots if s.kind == LORA_A}), modules_to_save=[*norms, "fc"]))
    model.train()(torch.from_numpy(pixels()))  # one forward pass in train mode moves the running statistics
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(DeltaError, match="re-estimated BatchNorm statistics"):
        from_peft(tmp_path / "adapter", m, base_weights=read_frozen(bundle))


def test_a_batchnorm_delta_without_lora_is_refused_naming_what_peft_lacks(bundle, tmp_path):
    m = bundle.manifest
    bn_only = dataclasses.replace(m, method="bn+head", slots=tuple(s for s in m.slots if s.rank == 0))
    delta = Delta({s.name: np.zeros(s.shape, np.float32) for s in bn_only.slots}, dataclasses.replace(
        delta_from_init(m, 0).meta, method="bn+head", rank=0, alpha=0.0))
    with pytest.raises(DeltaError, match="PEFT has no BatchNorm-tuning method"):
        to_peft(delta, bn_only, tmp_path / "adapter", base_weights=read_frozen(bundle))
    assert not (tmp_path / "adapter").exists()


def test_a_conv_delta_without_base_weights_is_refused_asking_for_the_bundle(bundle, tmp_path):
    with pytest.raises(DeltaError, match="kernel shapes from the base weights"):
        to_peft(a_delta(bundle, seed=7), bundle.manifest, tmp_path / "adapter")


def test_a_batchnorm_statistic_of_another_length_is_refused_in_one_line(bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    base = read_frozen(bundle)
    to_peft(a_delta(bundle, seed=7), bundle.manifest, tmp_path / "adapter", base_weights=base)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith("running_mean"))
    tensors[key] = tensors[key][:-1]  # a hostile adapter: one channel short
    save_file(tensors, path)
    with pytest.raises(DeltaError, match="differs from the bundle's running_mean"):
        from_peft(tmp_path / "adapter", bundle.manifest, base_weights=base)
