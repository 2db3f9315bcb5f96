"""The one place for every name: delta slots, graph inputs and outputs, bundle files.

A slot name is ``<module path>.<kind>`` (``bert.encoder.layer.0.attention.self.query.lora_A``).
The same string names the tensor in a delta file, the graph input in both ONNX graphs, and the
slot in the manifest; ``grad_name`` names its gradient output in ``train.onnx``.
"""

from __future__ import annotations

from edgepeft.errors import DeltaError

# Kinds of delta slot; each is owned by one registered method (edgepeft.methods), which says what it does.
LORA_A = "lora_A"  # (r, in)   lora: y += s*(x A^T) B^T
LORA_B = "lora_B"  # (out, r)
BIAS = "bias"  # (out,)    bitfit (and the head's bias): y += db
WEIGHT = "weight"  # (out, in) head: y += x dW^T
IA3_L = "ia3_l"  # (out,)    ia3: y = base(x) * l
IA3_FF = "ia3_ff"  # (in,)     ia3 on a feed-forward input: y = base(x * l)
DORA_A = "dora_A"  # (r, in)   dora: y = g*(x W^T + s*(x A^T) B^T) + b, g = (|W| + dm) / |W + s B A| per row
DORA_B = "dora_B"  # (out, r)
DORA_M = "dora_m"  # (out,)    dora: magnitude minus the base weight's row norm (PEFT's magnitude = |W| + dm)
# methods3: VeRA, the r x r core (LoRA-XS) and bottleneck adapters
VERA_D = "vera_d"  # (r,)      vera: y += b * ((d * (x A^T)) B^T), A and B frozen and shared
VERA_B = "vera_b"  # (out,)
XS_R = "xs_R"  # (r, r)    loraxs: y += ((x V^T) R^T) U^T, U = U_r S_r and V^T = V_r^T frozen (SVD of W)
ADAPTER_DOWN = "adapter_down"  # (m, out)  bottleneck: y += up(act(down(y)))
ADAPTER_DOWN_BIAS = "adapter_down_bias"  # (m,)
ADAPTER_UP = "adapter_up"  # (out, m)
ADAPTER_UP_BIAS = "adapter_up_bias"  # (out,)
# issue 14: virtual tokens (prompt, ptuning) and key/value prefixes (prefix); V virtual tokens, H hidden size,
# h the encoder's hidden size, K = key/value heads x head dim, L layers. Their module is PROMPT_MODULE.
PROMPT = "prompt_embeddings"  # (V, H)    prompt: inputs_embeds = [P; embed(ids)]
PT_EMBEDDING = "pt_embedding"  # (V, H)    ptuning: P = W2 relu(W1 relu(W0 E + b0) + b1) + b2 (PEFT's MLP encoder)
PT_W0 = "pt_w0"  # (h, H)
PT_B0 = "pt_b0"  # (h,)
PT_W1 = "pt_w1"  # (h, h)
PT_B1 = "pt_b1"  # (h,)
PT_W2 = "pt_w2"  # (H, h)
PT_B2 = "pt_b2"  # (H,)
PREFIX = "prefix_embeddings"  # (V, 2LK) prefix: per token [k_0 v_0 k_1 v_1 ...], each layer's cache starts with them
PX_EMBEDDING = "px_embedding"  # (V, K)    prefix with projection: past = W1 tanh(W0 E + b0) + b1
PX_W0 = "px_w0"  # (h, K)
PX_B0 = "px_b0"  # (h,)
PX_W1 = "px_w1"  # (2LK, h)
PX_B1 = "px_b1"  # (2LK,)
PROMPT_MODULE = "prompt_encoder"  # the module path of every virtual-token slot (PEFT's prompt_encoder)
# issue 14: AdaLoRA, PEFT's SVD form: y += s*((x (P*λ)^T) Q^T), s = alpha / init_r; ranks pruned by zeroing λ
ADA_A = "ada_A"  # (r, in)   P (PEFT's lora_A)
ADA_E = "ada_E"  # (r,)      λ (PEFT's lora_E, stored (r, 1))
ADA_B = "ada_B"  # (out, r)  Q (PEFT's lora_B)
BN_SCALE = "bn_scale"  # (C,)      bn: y = bn(x) + ds * (x - mean) / sqrt(var + eps), running statistics frozen

# Graph inputs and outputs.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LABELS = "labels"
LOSS = "loss"
LOGITS = "logits"
PIXEL_VALUES = "pixel_values"  # image classification: (B, C, H, W) float32, normalized as the manifest's "image" says
INPUT_FEATURES = "input_features"  # audio classification: (B, 1, mels, frames) log-mel float32, as the manifest's "audio" says
GRAD_PREFIX = "grad."

# Files of a bundle.
MANIFEST_FILE = "manifest.json"
INFER_GRAPH_FILE = "model.onnx"
TRAIN_GRAPH_FILE = "train.onnx"
WEIGHTS_FILE = "weights.bin"
WEIGHTS_INDEX_FILE = "weights.json"  # name -> offset, dtype, shape, quantization of each frozen tensor
TOKENIZER_FILE = "tokenizer.json"

# Tasks.
SEQ_CLS = "sequence-classification"
TOKEN_CLS = "token-classification"  # a label per token (BIO tags): logits (B, T, C), labels (B, T)
CAUSAL_LM = "causal-lm"
IMAGE_CLS = "image-classification"
AUDIO_CLS = "audio-classification"  # a label per clip (keyword spotting): log-mel features computed on the device
TASKS = (SEQ_CLS, TOKEN_CLS, CAUSAL_LM, IMAGE_CLS, AUDIO_CLS)
CLASSIFICATION_TASKS = (SEQ_CLS, TOKEN_CLS, IMAGE_CLS, AUDIO_CLS)  # tasks with a classifier head, named labels and labels in the train graph
CNN_INPUTS = {IMAGE_CLS: PIXEL_VALUES, AUDIO_CLS: INPUT_FEATURES}  # the convolutional tasks and the one input their graphs take
IGNORED_LABEL = -100  # a token without a label (special tokens, later sub-words, padding): HF's ignore_index


def slot_kinds() -> tuple[str, ...]:
    """Every slot kind some registered method owns."""
    from edgepeft.methods import kinds  # the registry imports this module: import it when asked

    return kinds()


def slot_name(module: str, kind: str) -> str:
    """Name of the delta slot of ``kind`` on ``module``."""
    if kind not in slot_kinds():
        raise DeltaError(f"unknown slot kind {kind!r}; expected one of {', '.join(slot_kinds())}")
    return f"{module}.{kind}"


def split_slot_name(name: str) -> tuple[str, str]:
    """Inverse of :func:`slot_name`: ``(module, kind)``."""
    module, _, kind = name.rpartition(".")
    if not module or kind not in slot_kinds():
        raise DeltaError(f"{name!r} is not a slot name (<module>.<kind>, kind in {', '.join(slot_kinds())})")
    return module, kind


def grad_name(slot: str) -> str:
    """Name of the gradient output of ``slot`` in ``train.onnx``."""
    return GRAD_PREFIX + slot


FROZEN_PREFIX = "frozen."


def frozen_name(param: str) -> str:
    """Name of a frozen base weight (torch parameter path) in the graphs and weights.bin."""
    return FROZEN_PREFIX + param


def is_safe_name(name: str) -> bool:
    """True for a tensor name that can never be read as a path or control sequence."""
    return (
        0 < len(name) <= 512
        and "/" not in name
        and "\\" not in name
        and ".." not in name
        and name.isprintable()
        and not name.startswith(".")
    )


# ---- causal language models (issue 16) -----------------------------------------------------------
# train.onnx of a causal LM takes the positions that carry a label instead of scoring every position:
# TARGET_INDEX (K, M) holds flat indices b*T + t of the positions whose next token is a target,
# TARGET_IDS (K, M) those next tokens (-1: padding of the layout). K is fixed at export (loss chunks).
TARGET_INDEX = "target_index"
TARGET_IDS = "target_ids"
CHAT_TEMPLATE_FILE = "chat_template.json"


def past_name(layer: int, kind: str) -> str:
    """model.onnx input holding layer ``layer``'s cached keys or values (``kind``: key | value), (B, heads, P, D)."""
    return f"past.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """model.onnx output: the cache after this call, (B, heads, P + T, D); fed back as :func:`past_name`."""
    return f"present.{layer}.{kind}"
