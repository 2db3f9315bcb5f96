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
from peft import IA3Config, LoraConfig, get_peft_model

from edgepeft.names import BIAS, IA3_FF, IA3_L, LORA_A, LORA_B, SEQ_CLS, WEIGHT, split_slot_name
from edgepeft.runtime.bundle import Bundle
from edgepeft.runtime.weights import read_frozen


def load_hf(model_dir: Path, bundle: Bundle) -> torch.nn.Module:
    """The HF model of the bundle, with exactly the bundle's (dequantized) frozen weights."""
    tf.logging.set_verbosity_error()
    m = bundle.manifest
    if m.task == SEQ_CLS:
        model = tf.AutoModelForSequenceClassification.from_pretrained(
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
        cfg = LoraConfig(r=lora[0].rank, lora_alpha=lora[0].alpha, target_modules=targets, lora_dropout=0.0)
        model = get_peft_model(model, cfg)
        for s in slots:
            if s.kind in (LORA_A, LORA_B):
                layer = model.base_model.model.get_submodule(s.module)
                p = (layer.lora_A if s.kind == LORA_A else layer.lora_B)["default"].weight
                with torch.no_grad():
                    p.copy_(torch.from_numpy(tensors[s.name]))
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
    for p in grads_of.values():  # get_peft_model froze everything but its own method
        p.requires_grad_(True)
    return model.eval(), grads_of


def logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def loss_and_grads(model, grads_of, task: str, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray | None):
    """Standard torch losses (F.cross_entropy / HF's own LM loss) and autograd gradients."""
    for p in grads_of.values():
        p.grad = None
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    if task == SEQ_CLS:
        out = model(input_ids=ids_t, attention_mask=mask_t).logits
        loss = F.cross_entropy(out, torch.from_numpy(labels))
    else:
        loss = model(input_ids=ids_t, attention_mask=mask_t, labels=ids_t.masked_fill(mask_t == 0, -100)).loss
    loss.backward()
    return float(loss), {k: p.grad.numpy().copy() for k, p in grads_of.items()}
