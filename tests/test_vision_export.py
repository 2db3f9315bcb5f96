"""A plain nn.Module CNN exports to a bundle whose graphs compute what torch + PEFT computes on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from conftest import random_delta
from edgepeft.errors import ExportError
from edgepeft.names import BIAS, BN_SCALE, LABELS, LORA_A, LORA_B, LOSS, PIXEL_VALUES, WEIGHT, grad_name, split_slot_name
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.weights import read_frozen
from tiny_cnn import LABELS as CLASSES, SIZE, TinyCNN, export_tiny, tiny_cnn


def pixels(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SIZE)).astype(np.float32)


def reference(bundle, tensors: dict[str, np.ndarray], model: nn.Module | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """torch + PEFT on the bundle's stored (dequantized) weights with ``tensors`` as the delta, and each
    slot's torch counterpart: PEFT's lora_A/lora_B conv weights, the BatchNorm γ and β, the head's weight and bias.
    ``model``: the bundle's architecture (default the tiny CNN); its weights are replaced by the bundle's."""
    m = bundle.manifest
    model = model if model is not None else TinyCNN(classes=len(m.labels))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in read_frozen(bundle).items()})
    model.eval()
    lora = sorted({s.module for s in m.slots if s.kind == LORA_A})
    if lora:
        rank, alpha = m.slots[[s.kind for s in m.slots].index(LORA_A)].rank, m.slots[[s.kind for s in m.slots].index(LORA_A)].alpha
        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora, init_lora_weights=False))
        net = peft.base_model.model
    else:  # BN + head: plain torch, as PEFT has no BatchNorm tuning
        peft = net = model
    theirs = {}
    with torch.no_grad():
        for s in m.slots:
            module, kind = split_slot_name(s.name)
            t = torch.from_numpy(tensors[s.name])
            layer = net.get_submodule(module)
            if kind in (LORA_A, LORA_B):
                p = (layer.lora_A if kind == LORA_A else layer.lora_B)["default"].weight
                p.copy_(t.reshape(p.shape))
            else:  # the delta adds to the frozen γ, β or head weight and bias
                base = layer.base_layer if hasattr(layer, "base_layer") else layer
                p = {BN_SCALE: base.weight, BIAS: base.bias, WEIGHT: base.weight}[kind]
                p += t
            p.requires_grad_(True)
            theirs[s.name] = p
    return peft, theirs


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_train_step_loss_and_gradients_match_torch_peft_on_the_same_weights(cnn_bundle, quantize):
    bundle = open_bundle(cnn_bundle(quantize))
    delta = random_delta(bundle.manifest, seed=3, magnitude=0.2)
    x, y = pixels(), np.array([0, 2, 1, 2])
    names = [s.name for s in bundle.manifest.slots]
    out = bundle.session("train").run([LOSS, *map(grad_name, names)], {PIXEL_VALUES: x, LABELS: y, **delta.tensors})
    peft, theirs = reference(bundle, delta.tensors)
    loss = nn.functional.cross_entropy(peft(torch.from_numpy(x)), torch.from_numpy(y))
    grads = torch.autograd.grad(loss, [theirs[n] for n in names])
    assert abs(float(out[0]) - loss.item()) < 1e-5
    for n, ours, g in zip(names, out[1:], grads):
        g = g.reshape(ours.shape).numpy()
        assert np.abs(ours - g).max() <= 1e-4 * max(1.0, np.abs(g).max()), n


def test_inference_graph_with_a_delta_matches_torch_peft(cnn_bundle):
    from edgepeft.runtime.infer import Predictor

    bundle = open_bundle(cnn_bundle("int8"))
    delta = random_delta(bundle.manifest, seed=4, magnitude=0.2)
    x = pixels(3, seed=1)
    ours = Predictor(bundle).image_logits(x, [delta])
    peft, _ = reference(bundle, delta.tensors)
    with torch.no_grad():
        theirs = peft(torch.from_numpy(x)).numpy()
    assert np.abs(ours - theirs).max() < 1e-4


def test_int8_bundle_stores_every_ungrouped_convolution_weight_as_int8_per_output_channel(cnn_bundle):
    import json

    index = json.loads((cnn_bundle("int8") / "weights.json").read_text())
    convs = {n: m for n, m in tiny_cnn().named_modules() if isinstance(m, nn.Conv2d)}
    assert {m.groups > 1 for m in convs.values()} == {True, False}  # the tiny CNN has both kinds
    for c, m in convs.items():
        if m.groups == 1:
            assert index["quantized"][f"frozen.{c}.weight"] == {"axis": 0, "block": None}
            assert index["tensors"][f"frozen.{c}.weight.q"]["dtype"] == "int8"
        else:  # depthwise kernels stay fp32: onnxruntime's fast depthwise kernel needs a constant weight
            assert f"frozen.{c}.weight" not in index["quantized"]
            assert index["tensors"][f"frozen.{c}.weight"]["dtype"] == "float32"


def test_a_layer_kind_the_exporter_does_not_know_is_refused_by_name_and_nothing_is_written(tmp_path):
    class Odd(nn.Module):  # a leaf with weights of its own: the exporter cannot know what it computes
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.gain[:, None, None]

    model = tiny_cnn()
    model.blocks[1].odd = Odd()
    with pytest.raises(ExportError, match=r"^layer 'blocks\.1\.odd' is a Odd, which the convolutional exporter does not know"):
        from edgepeft.exporters.modules import export_bundle

        export_bundle(model, torch.zeros(1, *SIZE), tmp_path / "b", labels=CLASSES, head="fc")
    assert list(tmp_path.iterdir()) == []


def test_lora_on_a_depthwise_convolution_is_refused_with_the_reason(tmp_path):
    from edgepeft.exporters.modules import export_bundle

    with pytest.raises(ExportError, match=r"blocks\.0\.dw is a grouped \(depthwise\) convolution \(groups=16\).*rank divisible"):
        export_bundle(tiny_cnn(), torch.zeros(1, *SIZE), tmp_path / "b", labels=CLASSES, head="fc",
                      method_config={"lora.targets": "dw"})
    assert list(tmp_path.iterdir()) == []


def test_a_method_without_a_convolution_form_is_refused(tmp_path):
    with pytest.raises(ExportError, match="method 'ia3' does not support convolutional models"):
        export_tiny(tmp_path / "b", method="ia3")


def test_manifest_records_the_image_input_and_the_planned_slots(cnn_bundle):
    m = open_bundle(cnn_bundle("none")).manifest
    assert m.task == "image-classification" and m.labels == CLASSES
    assert m.extra["image"] == {"channels": 3, "height": 12, "width": 12, "mean": [0.5] * 3, "std": [0.25] * 3}
    kinds = {(split_slot_name(s.name)[0].split(".")[-1], s.kind) for s in m.slots}
    assert ("stem", LORA_A) in kinds and ("project", LORA_B) in kinds and ("bn1", BN_SCALE) in kinds
    assert ("fc", WEIGHT) in kinds and not any(mod == "dw" for mod, _ in kinds)
    stem_a = m.slot("stem.lora_A")
    assert stem_a.shape == (2, 3 * 3 * 3)  # PEFT's A conv (r, in, kh, kw), flattened


def test_cli_vision_export_refuses_an_unknown_model_or_a_missing_weights_file_in_one_line(tmp_path, capsys):
    from cli_helpers import error_lines, run_cli

    r = run_cli(capsys, "export", "--vision", "resnet-9000", "--weights", tmp_path / "w.pth", "--labels", "a,b", "-o", tmp_path / "b")
    assert r.code != 0 and error_lines(r) == ["Error: --vision 'resnet-9000': unknown model; known: efficientnet-lite0"]
    r = run_cli(capsys, "export", "--vision", "efficientnet-lite0", "--weights", tmp_path / "w.pth", "--labels", "a,b",
                "-o", tmp_path / "b")
    assert r.code != 0 and error_lines(r) == [f"Error: --weights {tmp_path / 'w.pth'}: no such file"]
    assert not (tmp_path / "b").exists()


def test_efficientnet_same_padding_that_is_symmetric_becomes_the_convolutions_own_with_the_same_output():
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    from edgepeft.exporters.vision_specs import fold_symmetric_padding

    torch.manual_seed(0)
    net = nn.Sequential(Conv2dStaticSamePadding(8, 8, 5, stride=1, groups=8, image_size=7),  # pads 2 on every side
                        Conv2dStaticSamePadding(8, 8, 3, stride=2, image_size=8)).eval()  # pads 0 left, 1 right: kept
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        before = net(x)
        fold_symmetric_padding(net)
        after = net(x)
    assert tuple(net[0].padding) == (2, 2) and isinstance(net[0].static_padding, nn.Identity)
    assert isinstance(net[1].static_padding, nn.ZeroPad2d) and tuple(net[1].padding) == (0, 0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_bn_tuning_computes_the_norms_output_as_the_frozen_norm_plus_its_scale_delta():
    from edgepeft.exporters.inject import DeltaFeed, DeltaLinear
    from edgepeft.exporters.methods import torch_method

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.normal_(), bn.bias.data.normal_()
    ds = torch.randn(6)
    layer = DeltaLinear(bn, "bn", DeltaFeed({"s": ds}), [(torch_method("bn"), {BN_SCALE: "s"})])
    x = torch.randn(3, 6, 4, 4)
    x_hat = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var + bn.eps)[:, None, None]
    torch.testing.assert_close(layer(x), bn(x) + ds[:, None, None] * x_hat)


def test_two_methods_that_each_compute_a_layers_output_are_refused_naming_the_layer():
    from edgepeft.exporters.inject import DeltaFeed, DeltaLinear
    from edgepeft.exporters.methods import TorchMethod, torch_method

    class Other(TorchMethod):
        name = "other"

        def replace(self, layer, x, t):
            return x

    layer = DeltaLinear(nn.BatchNorm2d(2).eval(), "blocks.0.bn", DeltaFeed({"s": torch.zeros(2), "o": torch.zeros(2)}),
                        [(torch_method("bn"), {BN_SCALE: "s"}), (Other(), {"k": "o"})])
    with pytest.raises(ExportError, match=r"blocks\.0\.bn: methods bn, other each compute the layer's output"):
        layer(torch.randn(1, 2, 3, 3))
