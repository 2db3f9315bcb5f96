"""Instruction data for a causal LM: the chat template on the device, loss on the completion only, bad rows by line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import torch_reference
from conftest import random_delta
from edgepeft.errors import DataError
from edgepeft.names import LOSS, grad_name
from edgepeft.runtime.chat_data import load_chat_template, render
from edgepeft.runtime.data import load_dataset
from edgepeft.runtime.lm_targets import LOSS_MASK, loss_chunks, train_feeds
from edgepeft.runtime.text import load_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 w8"}],
    [{"role": "system", "content": "w9"}, {"role": "user", "content": "w10"}, {"role": "assistant", "content": "w11"},
     {"role": "user", "content": "w12 w13"}, {"role": "assistant", "content": "w14 w15 w16"}],
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["exchange", "system-and-two-turns"])
@pytest.mark.parametrize("generation", [False, True])
def test_the_bundles_chat_template_renders_as_the_tokenizers_does(conv, generation, model_dirs, bundles):
    from transformers import AutoTokenizer

    b = bundles("llama")
    pieces = load_chat_template(b.path, b.manifest)
    hf = AutoTokenizer.from_pretrained(model_dirs("llama"))
    assert render(pieces, conv, generation) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=generation)


def test_prompt_completion_rows_train_on_the_completion_tokens_only(tmp_path, model_dirs, bundles):
    from transformers import AutoTokenizer

    b = bundles("llama")
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w5 w6", "completion": "w7 w8"}]), b.manifest,
                      load_tokenizer(b), bundle_path=b.path)
    hf = AutoTokenizer.from_pretrained(model_dirs("llama"))
    conv = CONVERSATIONS[0]
    encode = lambda text: hf(text, add_special_tokens=False).input_ids  # noqa: E731 (as apply_chat_template encodes)
    prompt = encode(hf.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True))
    full = encode(hf.apply_chat_template(conv, tokenize=False))
    assert ds.ids[0] == full
    assert ds.loss_masks[0] == [0] * len(prompt) + [1] * (len(full) - len(prompt))  # w7 w8 <|im_end|> \n


def test_messages_rows_train_on_every_assistant_message(tmp_path, bundles):
    b = bundles("llama")
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATIONS[1]}]), b.manifest,
                      load_tokenizer(b), bundle_path=b.path)
    tok = load_tokenizer(b)
    targets = [tok.id_to_token(i) for i, f in zip(ds.ids[0], ds.loss_masks[0]) if f]
    assert targets == ["w11", "<|im_end|>", "w14", "w15", "w16", "<|im_end|>"]  # the newline is not a word-level token


def test_instruction_train_step_gives_torch_loss_and_gradients_with_prompt_labels_ignored(tmp_path, model_dirs, bundles):
    b = bundles("llama")
    rows = [{"prompt": "w5 w6 w7", "completion": "w8 w9"}, {"messages": CONVERSATIONS[1]}, {"text": "w20 w21 w22"}]
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), b.manifest, load_tokenizer(b), bundle_path=b.path)
    batch = ds.batch([0, 1, 2])
    sess = b.session("train")
    delta = random_delta(b.manifest, seed=5)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {**train_feeds(batch, loss_chunks(sess)), **delta.tensors})))
    ref, params = torch_reference.with_deltas(torch_reference.load_hf(model_dirs("llama"), b), b, delta.tensors)
    ids, mask = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
    labels = ids.masked_fill(torch.from_numpy(batch[LOSS_MASK]) == 0, -100)  # HF: -100 = not a target
    loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert abs(float(outs[LOSS]) - float(loss)) <= 1e-4 * float(loss)
    for s in b.manifest.slots:
        g = params[s.name].grad.numpy()
        assert np.abs(outs[grad_name(s.name)] - g).max() <= 1e-4 * np.abs(g).max(), s.name


@pytest.mark.parametrize("row, fragment", [
    ({"prompt": "w5"}, "expected {\"prompt\""),
    ({"question": "w5", "answer": "w6"}, "expected {\"prompt\""),
    ({"prompt": "w5", "completion": 3}, "must both be strings"),
    ({"prompt": "w5", "completion": "  "}, "empty completion"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "w5"}]}, "message 0 needs a 'role'"),
    ({"messages": [{"role": "user", "content": "w5"}, {"role": "system", "content": "w6"}]}, "message 1 is a system message"),
    ({"messages": [{"role": "user", "content": "w5"}]}, "no assistant message"),
    ('{"prompt": "w5", ', "not valid JSON"),
])
def test_a_bad_instruction_row_is_refused_naming_file_and_line(row, fragment, tmp_path, bundles):
    b = bundles("llama")
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w5", "completion": "w6"}, row])
    with pytest.raises(DataError, match=rf"{p}:2: .*") as e:
        load_dataset(p, b.manifest, load_tokenizer(b), bundle_path=b.path)
    assert fragment in str(e.value)


def test_a_prompt_longer_than_the_max_length_is_refused_naming_the_row(tmp_path, bundles):
    b = bundles("llama")
    long = " ".join(["w5"] * (b.manifest.max_length + 3))
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w5", "completion": "w6"}, {"prompt": long, "completion": "w6"}])
    with pytest.raises(DataError, match=rf"{p}:2: the prompt is \d+ tokens, the bundle's max length is {b.manifest.max_length}"):
        load_dataset(p, b.manifest, load_tokenizer(b), bundle_path=b.path)


def test_messages_rows_need_a_chat_template(tmp_path, bundles):
    b = bundles("gpt2")  # its tiny tokenizer has no chat template
    assert b.manifest.chat_template is None
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(DataError, match=rf"{p}:1: this bundle has no chat template"):
        load_dataset(p, b.manifest, load_tokenizer(b), bundle_path=b.path)


def test_without_a_template_prompt_and_completion_join_and_only_the_completion_is_a_target(tmp_path, bundles):
    b = bundles("gpt2")
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w5 w6", "completion": " w7"}]), b.manifest,
                      load_tokenizer(b), bundle_path=b.path)
    tok = load_tokenizer(b)
    assert [tok.id_to_token(i) for i in ds.ids[0]] == ["w5", "w6", "w7"] and ds.loss_masks[0] == [0, 0, 1]
