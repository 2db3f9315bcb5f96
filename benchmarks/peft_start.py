"""torch + PEFT's model started where edgepeft starts: one setup for bench_methods' torch child and ptuning_probe.

``to_peft`` writes edgepeft's fresh delta as a PEFT adapter. PEFT loads most methods from it trainable; it loads no
prompt-learning adapter trainable, and a P-tuning adapter file holds only the encoder's output, so for the
virtual-token methods the model is built from the adapter's config and edgepeft's start is copied into PEFT's prompt
encoder and the head's trainable copy. Workstation-only (torch); bench_methods' child imports it by file path.
"""

from __future__ import annotations

import os
import tempfile

from edgepeft.names import PREFIX, PROMPT, PROMPT_MODULE, PT_B0, PT_B1, PT_B2, PT_EMBEDDING, PT_W0, PT_W1, PT_W2

# edgepeft's prompt-encoder slot kind -> the parameter of PEFT's prompt encoder that holds it
ENCODER = {PROMPT: "embedding.weight", PREFIX: "embedding.weight", PT_EMBEDDING: "embedding.weight",
           PT_W0: "mlp_head.0.weight", PT_B0: "mlp_head.0.bias", PT_W1: "mlp_head.2.weight", PT_B1: "mlp_head.2.bias",
           PT_W2: "mlp_head.4.weight", PT_B2: "mlp_head.4.bias"}


def peft_model(bundle, seed: int):
    """PEFT's model of ``bundle``'s method on fp32 all-MiniLM-L6-v2, trainable, in eval mode (edgepeft's graphs have
    no dropout), its trainable tensors equal to edgepeft's fresh delta for ``seed``."""
    import torch
    import transformers
    from peft import PeftConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    from edgepeft.delta import delta_from_init
    from edgepeft.delta.peft_format import to_peft
    from edgepeft.demo.assets import minilm_dir
    from edgepeft.runtime.weights import read_frozen

    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers.logging.set_verbosity_error()
    start = delta_from_init(bundle.manifest, seed)
    adapter = tempfile.mkdtemp()
    to_peft(start, bundle.manifest, adapter, base_weights=read_frozen(bundle))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, attn_implementation="eager")
    if not any(s.module == PROMPT_MODULE for s in bundle.manifest.slots):
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        model.eval()
        return model
    cfg = PeftConfig.from_pretrained(adapter)
    cfg.inference_mode = False
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for k, v in start.tensors.items():
            module, _, kind = k.rpartition(".")
            if module == PROMPT_MODULE:
                model.prompt_encoder["default"].get_parameter(ENCODER[kind]).copy_(torch.from_numpy(v))
        for k, v in load_file(os.path.join(adapter, "adapter_model.safetensors")).items():  # the bundle's head
            if k != PROMPT:
                module, _, leaf = k.removeprefix("base_model.").rpartition(".")
                getattr(model.base_model.get_submodule(module).modules_to_save["default"], leaf).copy_(v)
    model.eval()
    return model


def torch_param(model, slot: str):
    """The torch parameter that holds edgepeft's trainable ``slot`` (a prompt-encoder tensor or the head's)."""
    module, _, kind = slot.rpartition(".")
    if module == PROMPT_MODULE:
        return model.prompt_encoder["default"].get_parameter(ENCODER[kind])
    return getattr(model.base_model.classifier.modules_to_save["default"], kind)
