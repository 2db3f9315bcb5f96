"""The competitor on the same weights: a Hugging Face model + PEFT LoRA, loaded from a bundle's frozen weights.

Bias and head deltas are added to the model's own biases and weights (PEFT's LoRA has no additive
bias delta), so their gradients are the gradients of those parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers as tf
from peft import (AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, VeraConfig,
                  get_peft_model)

from edgepeft.names import (BIAS, DORA_A, DORA_B, DORA_M, IA3_FF, IA3_L, IGNORED_LABEL, LORA_A, LORA_B, SEQ_CLS, TOKEN_CLS, WEIGHT,
                            split_slot_name)
from edgepeft.names import ADA_A, ADA_B, ADA_E
from edgepeft.names import ADAPTER_DOWN, ADAPTER_DOWN_BIAS, ADAPTER_UP, ADAPTER_UP_BIAS, VERA_B, VERA_D, XS_R
from edgepeft import methods
from edgepeft.names import PREFIX, PROMPT, PT_B0, PT_B1, PT_B2, PT_EMBEDDING, PT_W0, PT_W1, PT_W2, PX_B0, PX_B1, PX_EMBEDDING, PX_W0, PX_W1
from edgepeft.runtime.bundle import Bundle
from edgepeft.runtime.weights import read_frozen


def load_hf(model_dir: Path, bundle: Bundle) -> torch.nn.Module:
    """The HF model of the bundle, with exactly the bundle's (dequantized) frozen weights."""
    tf.logging.set_verbosity_error()
    m = bundle.manifest
    if m.task in (SEQ_CLS, TOKEN_CLS):
        auto = tf.AutoModelForTokenClassification if m.task == TOKEN_CLS else tf.AutoModelForSequenceClassification
        model = auto.from_pretrained(
            model_dir, num_labels=len(m.labels), ignore_mismatched_sizes=True, attn_implementation="eager")
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    own = model.state_dict()
    state = {k: torch.from_numpy(np.array(v)) for k, v in read_frozen(bundle).items() if k in own}  # not buffers like position_ids
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing  # only tied weights may be absent
    return model.eval()


def with_deltas(model: torch.nn.Module, bundle: Bundle, tensors: dict[str, np.ndarray]):
    """Apply deltas the PEFT way; return (model, {slot name: torch parameter whose grad is the slot's grad})."""
    slots = bundle.manifest.slots
    for p in model.parameters():
        p.requires_grad_(False)
    grads_of: dict[str, torch.nn.Parameter] = {}
    for s in slots:
        module, kind = split_slot_name(s.name)
        if kind not in (BIAS, WEIGHT):
            continue
        lin = model.get_submodule(module)
        if kind == BIAS:
            with torch.no_grad():
                lin.bias.add_(torch.from_numpy(tensors[s.name]))
            lin.bias.requires_grad_(True)
            grads_of[s.name] = lin.bias
        elif kind == WEIGHT:
            with torch.no_grad():
                lin.weight.add_(torch.from_numpy(tensors[s.name]))
            lin.weight.requires_grad_(True)
            grads_of[s.name] = lin.weight
    lora = [s for s in slots if s.kind == LORA_A]
    if lora:
        targets = sorted({s.module for s in lora})
        r = tensors[lora[0].name].shape[0]  # a merge may carry a higher rank than the bundle's, at the same scale
        cfg = LoraConfig(r=r, lora_alpha=lora[0].scale * r, target_modules=targets, lora_dropout=0.0)
        model = get_peft_model(model, cfg)
        for s in slots:
            if s.kind in (LORA_A, LORA_B):
                layer = model.base_model.model.get_submodule(s.module)
                p = (layer.lora_A if s.kind == LORA_A else layer.lora_B)["default"].weight
                with torch.no_grad():
                    p.copy_(torch.from_numpy(tensors[s.name]))
                grads_of[s.name] = p
    dora = [s for s in slots if s.kind == DORA_A]
    if dora:  # PEFT's DoRA: magnitude = ‖W‖ (its init) + the delta's offset
        r = tensors[dora[0].name].shape[0]
        cfg = LoraConfig(r=r, lora_alpha=dora[0].scale * r, target_modules=sorted({s.module for s in dora}),
                         lora_dropout=0.0, use_dora=True)
        model = get_peft_model(model, cfg)
        for s in slots:
            if s.kind not in (DORA_A, DORA_B, DORA_M):
                continue
            layer = model.base_model.model.get_submodule(s.module)
            if s.kind == DORA_M:
                p = layer.lora_magnitude_vector["default"].weight
                w = layer.get_base_layer().weight
                w = w.t() if getattr(layer, "fan_in_fan_out", False) else w
                value = torch.linalg.norm(w.detach(), dim=1) + torch.from_numpy(tensors[s.name])
            else:
                p = (layer.lora_A if s.kind == DORA_A else layer.lora_B)["default"].weight
                value = torch.from_numpy(tensors[s.name])
            with torch.no_grad():
                p.copy_(value)
            grads_of[s.name] = p
    ada = [s for s in slots if s.kind == ADA_E]
    if ada:  # PEFT's AdaLoRA (SVDLinear); a merge may hold more triplets at the same scale alpha / init_r
        r = max(tensors[s.name].shape[0] for s in ada)
        cfg = AdaLoraConfig(init_r=r, target_r=1, lora_alpha=ada[0].scale * r, total_step=1, lora_dropout=0.0,
                            target_modules=sorted({s.module for s in ada}))
        model = get_peft_model(model, cfg)
        for s in slots:
            if s.kind in (ADA_A, ADA_E, ADA_B):
                layer = model.base_model.model.get_submodule(s.module)
                p = {ADA_A: layer.lora_A, ADA_E: layer.lora_E, ADA_B: layer.lora_B}[s.kind]["default"]
                v = torch.from_numpy(tensors[s.name])
                with torch.no_grad():
                    p.zero_()  # a pruned module holds fewer triplets: the rest stay zero
                    if s.kind == ADA_B:
                        p[:, :v.shape[1]] = v
                    else:
                        p[:v.shape[0]] = v.reshape(-1, *p.shape[1:])
                grads_of[s.name] = p
    ia3 = [s for s in slots if s.kind in (IA3_L, IA3_FF)]
    if ia3:
        cfg = IA3Config(target_modules=sorted({s.module for s in ia3}),
                        feedforward_modules=sorted({s.module for s in ia3 if s.kind == IA3_FF}))
        model = get_peft_model(model, cfg)
        for s in ia3:
            p = model.base_model.model.get_submodule(s.module).ia3_l["default"]
            with torch.no_grad():
                p.copy_(torch.from_numpy(tensors[s.name]).reshape(p.shape))
            grads_of[s.name] = p
    # methods3: VeRA. PEFT draws A and B itself from the seed in the manifest: parity also proves the
    # bundle's stored projections are PEFT's.
    vera = [s for s in slots if s.kind == VERA_D]
    if vera:
        opts = bundle.manifest.method_config["vera"]
        cfg = VeraConfig(r=vera[0].shape[0], target_modules=sorted({s.module for s in vera}),
                         projection_prng_key=opts["seed"], d_initial=opts["d_initial"], vera_dropout=0.0)
        model = get_peft_model(model, cfg)
        for s in slots:
            if s.kind in (VERA_D, VERA_B):
                layer = model.base_model.model.get_submodule(s.module)
                p = (layer.vera_lambda_d if s.kind == VERA_D else layer.vera_lambda_b)["default"]
                with torch.no_grad():
                    p.copy_(torch.from_numpy(tensors[s.name]))
                grads_of[s.name] = p
    # methods3: the r x r core (LoRA-XS) has no PEFT counterpart: a plain torch module, y = W x + U_r S_r R V_r^T x,
    # on the bundle's stored factors.
    xs = [s for s in slots if s.kind == XS_R]
    if xs:
        frozen = read_frozen(bundle)
        for s in xs:
            parent, _, leaf = s.module.rpartition(".")
            owner_ = model.get_submodule(parent)
            core = CoreRxR(getattr(owner_, leaf), frozen[f"{s.module}.xs_U"], frozen[f"{s.module}.xs_V"], tensors[s.name])
            setattr(owner_, leaf, core)
            grads_of[s.name] = core.r
    # methods3: bottleneck adapters: a plain torch module after the targeted projection.
    adapters = [s for s in slots if s.kind == ADAPTER_DOWN]
    if adapters:
        act = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh, "silu": torch.nn.SiLU}[
            bundle.manifest.method_config["bottleneck"]["non_linearity"]]()
        for s in adapters:
            parent, _, leaf = s.module.rpartition(".")
            owner_ = model.get_submodule(parent)
            ad = BottleneckAdapter(getattr(owner_, leaf), act, *(tensors[f"{s.module}.{k}"] for k in
                                   (ADAPTER_DOWN, ADAPTER_DOWN_BIAS, ADAPTER_UP, ADAPTER_UP_BIAS)))
            setattr(owner_, leaf, ad)
            for k, p in zip((ADAPTER_DOWN, ADAPTER_DOWN_BIAS, ADAPTER_UP, ADAPTER_UP_BIAS),
                            (ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias)):
                grads_of[f"{s.module}.{k}"] = p
    # issue 14: prompt tuning, P-tuning, prefix tuning: PEFT's own prompt encoder holds the slots
    if any(methods.owner(s.kind).virtual for s in slots):
        model = _prompt_learning(model, bundle, tensors, grads_of)
    for p in grads_of.values():  # get_peft_model froze everything but its own method
        p.requires_grad_(True)
    return model.eval(), grads_of


def _prompt_learning(model, bundle: Bundle, tensors: dict[str, np.ndarray], grads_of: dict) -> torch.nn.Module:
    """PEFT's prompt-learning model with the slots' values in its prompt encoder (and in its copy of the head)."""
    m = bundle.manifest
    (name, opts), = [(n, c) for n, c in m.method_config.items() if methods.get(n).virtual]
    t = {split_slot_name(s.name)[1]: s.name for s in m.slots if methods.owner(s.kind).virtual}
    task = "SEQ_CLS" if m.task == SEQ_CLS else "CAUSAL_LM"
    v = opts["num_virtual_tokens"]
    if name == "prompt":
        cfg = PromptTuningConfig(task_type=task, num_virtual_tokens=v)
        params = {PROMPT: "embedding.weight"}
    elif name == "ptuning":
        cfg = PromptEncoderConfig(task_type=task, num_virtual_tokens=v, encoder_reparameterization_type="MLP",
                                  encoder_hidden_size=tensors[t[PT_W0]].shape[0])
        params = {PT_EMBEDDING: "embedding.weight", PT_W0: "mlp_head.0.weight", PT_B0: "mlp_head.0.bias",
                  PT_W1: "mlp_head.2.weight", PT_B1: "mlp_head.2.bias", PT_W2: "mlp_head.4.weight", PT_B2: "mlp_head.4.bias"}
    else:
        proj = opts["projection"]
        cfg = PrefixTuningConfig(task_type=task, num_virtual_tokens=v, prefix_projection=proj,
                                 encoder_hidden_size=tensors[t[PX_W0]].shape[0] if proj else 8)
        params = ({PX_EMBEDDING: "embedding.weight", PX_W0: "transform.0.weight", PX_B0: "transform.0.bias",
                   PX_W1: "transform.2.weight", PX_B1: "transform.2.bias"} if proj else {PREFIX: "embedding.weight"})
    model = get_peft_model(model, cfg)
    encoder = model.prompt_encoder["default"]
    for kind, path in params.items():
        p = encoder.get_parameter(path)
        with torch.no_grad():
            p.copy_(torch.from_numpy(tensors[t[kind]]))
        grads_of[t[kind]] = p
    for s in m.slots:  # PEFT trains a copy of the classifier (modules_to_save), made from the delta-added weights
        if s.kind in (WEIGHT, BIAS) and hasattr(copy := model.base_model.get_submodule(s.module), "modules_to_save"):
            grads_of[s.name] = getattr(copy.modules_to_save["default"], s.kind)
    return model


def dense_state(model_dir: Path, bundle: Bundle, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float parameters of the model with the deltas merged in by PEFT (``merge_and_unload``), float64."""
    model, _ = with_deltas(load_hf(model_dir, bundle), bundle, tensors)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}


class CoreRxR(torch.nn.Module):
    """LoRA-XS by its definition: base(x) + x (U_r S_r R V_r^T)^T, with R trainable."""

    def __init__(self, base: torch.nn.Module, us: np.ndarray, vt: np.ndarray, r: np.ndarray) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("us", torch.from_numpy(np.array(us)))
        self.register_buffer("vt", torch.from_numpy(np.array(vt)))
        self.r = torch.nn.Parameter(torch.from_numpy(np.array(r)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ (self.us @ self.r @ self.vt).t()


class BottleneckAdapter(torch.nn.Module):
    """An adapter after a projection, as Houlsby et al. write it: h + up(act(down(h))), h = base(x)."""

    def __init__(self, base: torch.nn.Module, act: torch.nn.Module, dw, db, uw, ub) -> None:
        super().__init__()
        self.base, self.act = base, act
        self.down = torch.nn.Linear(dw.shape[1], dw.shape[0])
        self.up = torch.nn.Linear(uw.shape[1], uw.shape[0])
        with torch.no_grad():
            for p, v in ((self.down.weight, dw), (self.down.bias, db), (self.up.weight, uw), (self.up.bias, ub)):
                p.copy_(torch.from_numpy(np.array(v)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.up(self.act(self.down(h)))


def logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    return out[:, -ids.shape[1]:] if out.ndim == 3 else out  # PEFT's prompt tuning also returns the virtual positions


def loss_and_grads(model, grads_of, task: str, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray | None):
    """Standard torch losses (F.cross_entropy, ignore_index for unlabelled tokens / HF's own LM loss) and autograd gradients."""
    for p in grads_of.values():
        p.grad = None
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    if hasattr(getattr(model, "base_model", None), "rankallocator"):  # AdaLoRA adds its orthogonality term to HF's loss
        labels_t = torch.from_numpy(labels) if task in (SEQ_CLS, TOKEN_CLS) else ids_t.masked_fill(mask_t == 0, -100)
        loss = model.base_model(input_ids=ids_t, attention_mask=mask_t, labels=labels_t).loss  # PeftModel skips it
    elif task == SEQ_CLS:
        out = model(input_ids=ids_t, attention_mask=mask_t).logits
        loss = F.cross_entropy(out, torch.from_numpy(labels))
    elif task == TOKEN_CLS:
        out = model(input_ids=ids_t, attention_mask=mask_t).logits  # (B, T, C)
        loss = F.cross_entropy(out.flatten(0, 1), torch.from_numpy(labels).flatten(), ignore_index=IGNORED_LABEL)
    else:
        loss = model(input_ids=ids_t, attention_mask=mask_t, labels=ids_t.masked_fill(mask_t == 0, -100)).loss
    loss.backward()
    return float(loss), {k: p.grad.numpy().copy() for k, p in grads_of.items()}
