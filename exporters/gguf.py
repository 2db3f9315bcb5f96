"""A GGUF file (llama.cpp's format) as a float32 Hugging Face model directory the exporter can read.

transformers dequantizes GGUF weights (Q4_1, Q8_0, ...) to float32 when it loads them with
``gguf_file=``; that float32 model is the reference the bundle is checked against. The saved
config drops ``quantization_config`` (the weights are no longer quantized once loaded).
"""

from __future__ import annotations

import os
from pathlib import Path

from edgepeft.errors import ExportError


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a path naming a .gguf file (what `edgepeft export` converts before exporting)."""
    p = Path(os.fspath(path))
    return p.suffix.lower() == ".gguf"


def gguf_to_model_dir(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Load the GGUF model and tokenizer at ``path`` and save them as a float32 model directory ``out_dir``."""
    path, out = Path(os.fspath(path)), Path(os.fspath(out_dir))
    if not path.is_file():
        raise ExportError(f"{path}: no such GGUF file")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # one progress line per phase is the exporter's
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as e:
        raise ExportError(f"{path}: reading GGUF needs the gguf package ({e}); pip install \"edgepeft[export]\"") from None
    except Exception as e:  # transformers raises ValueError/KeyError/struct errors for unreadable or unsupported files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"{path}: transformers cannot read this GGUF file ({first}); "
                          "export a Hugging Face model directory instead") from None
    if hasattr(model.config, "quantization_config"):  # the weights are float32 now: save them as a plain model
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
