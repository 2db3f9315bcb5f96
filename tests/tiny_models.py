"""Tiny Hugging Face model directories built from configs (random weights) with a word-level tokenizer."""

from __future__ import annotations

from pathlib import Path

WORDS = [f"w{i}" for i in range(90)]
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nw1 w2 w3<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
ENCODERS = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
# Llama-shaped decoders (grouped-query attention); qwen2 adds q/k/v biases, mistral a sliding window.
DECODERS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def _tokenizer(specials: list[str], template: tuple[str, str] | None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        first, last = template
        single = " ".join(x for x in (first, "$A", last) if x)
        tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(t, vocab[t]) for t in (first, last) if t])
    return tok


def make_model(kind: str, root: Path, *, seed: int = 0) -> Path:
    """Save a tiny random model of ``kind`` under root/kind: a family of ENCODERS / DECODERS or gpt2
    (sequence classification / causal LM), or "<encoder>-token" (token classification, BIO labels)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    out = root / kind
    family, _, head = kind.partition("-token")  # "bert-token": the bert model with a token-classification head
    if family in ENCODERS:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(specials, ("[CLS]", "[SEP]")),
                                         pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
        common = dict(vocab_size=len(specials) + len(WORDS), num_labels=3, pad_token_id=0)
        if kind != family:  # BIO tags
            common.update(id2label=dict(enumerate(BIO)), label2id={t: i for i, t in enumerate(BIO)}, num_labels=len(BIO))
        layers = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        config_cls, prefix, extra = {
            "bert": ("BertConfig", "Bert", dict(**layers, max_position_embeddings=64)),
            "roberta": ("RobertaConfig", "Roberta", dict(**layers, max_position_embeddings=70)),
            "xlm-roberta": ("XLMRobertaConfig", "XLMRoberta", dict(**layers, max_position_embeddings=70)),
            # embedding size != hidden size: the embeddings_project path is in the graph
            "electra": ("ElectraConfig", "Electra", dict(**layers, embedding_size=16, max_position_embeddings=64)),
            "distilbert": ("DistilBertConfig", "DistilBert", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                    max_position_embeddings=64)),
        }[family]
        cfg = getattr(tf, config_cls)(**extra, **common)
        model = getattr(tf, prefix + ("ForTokenClassification" if kind != family else "ForSequenceClassification"))(cfg)
    elif kind in DECODERS:
        # ChatML markers as special tokens and SmolLM2-135M-Instruct's own chat template (a default system prompt)
        specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(specials, ("<s>", None)),
                                         pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                         additional_special_tokens=["<|im_start|>", "<|im_end|>"])
        tok.chat_template = CHATML
        config_cls, model_cls = DECODERS[kind]
        cfg = getattr(tf, config_cls)(vocab_size=len(specials) + len(WORDS), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                      tie_word_embeddings=False)
        model = getattr(tf, model_cls)(cfg)
    elif kind == "gpt2":
        specials = ["<|pad|>", "<|unk|>", "<|endoftext|>"]
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(specials, None),
                                         pad_token="<|pad|>", unk_token="<|unk|>", eos_token="<|endoftext|>")
        cfg = tf.GPT2Config(vocab_size=len(specials) + len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            eos_token_id=2, bos_token_id=2, pad_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # non-trivial biases and norms, so bias paths are really tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
