"""What is particular to virtual-token methods (prompt, ptuning, prefix) beyond the generic table:
the room they take from --max-length, and a causal LM's cache carrying them after the first call."""

from __future__ import annotations

import numpy as np
import pytest
from peft import PromptTuningConfig, get_peft_model

import torch_reference
from cli_helpers import error_lines, run_cli
from test_methods_table import perturbed
from edgepeft.delta import delta_from_init
from edgepeft.names import PROMPT, PROMPT_MODULE, slot_name
from edgepeft.runtime.prompt_init import with_text_init
from edgepeft.runtime.generate import Generator, Sampling
from edgepeft.runtime.infer import Predictor

# rows of the table (tests/test_methods_table.py): exported once per session
LLAMA_PROMPT = dict(method="prompt", method_config={"num_virtual_tokens": 4})
LLAMA_PREFIX = dict(method="prefix", method_config={"num_virtual_tokens": 4})  # int8
BERT_TEXT_PROMPT = dict(method="prompt", method_config={"num_virtual_tokens": 4, "init": "text", "init_text": "w5"})


def test_more_virtual_tokens_than_max_length_leaves_room_for_is_one_line_and_writes_nothing(capsys, model_dirs, tmp_path):
    out = tmp_path / "b"
    r = run_cli(capsys, "export", model_dirs("bert"), "-o", out, "--method", "prompt", "--method-config",
                "num_virtual_tokens=16", "--max-length", "16")
    assert r.code != 0
    lines = error_lines(r)
    assert len(lines) == 1 and "--max-length 16" in lines[0] and "num_virtual_tokens" in lines[0], r.err
    assert not out.exists()


def test_virtual_tokens_take_their_positions_from_the_users_tokens(bundles):
    m = bundles("llama", "none", **LLAMA_PROMPT).manifest
    assert m.max_length == 64 - 4  # the tiny Llama has 64 positions; the runtime truncates the user's text to the rest
    assert m.extra["context_length"] == 64 - 4


@pytest.mark.parametrize("quant, method", [("none", LLAMA_PROMPT), ("int8", LLAMA_PREFIX)], ids=["prompt", "prefix"])
def test_generation_feeds_virtual_tokens_once_and_matches_full_forwards(bundles, quant, method):
    # The cached path feeds the prompt (or starts from the prefix as its cache) on the first call only; every token
    # it picks is the greedy choice of a full forward over the virtual tokens + the text so far.
    bundle = bundles("llama", quant, **method)
    delta = perturbed(bundle.manifest, 5)
    p = Predictor(bundle)
    prompt = [2, 10, 11, 12]
    got = list(Generator(p).tokens(prompt, Sampling(max_new_tokens=5), [delta]))
    ids, want = list(prompt), []
    for _ in range(len(got)):
        x = np.asarray([ids], np.int64)
        nxt = int(p.logits(x, np.ones_like(x), [delta])[0, -1].argmax())
        want.append(nxt)
        ids.append(nxt)
    assert got and got == want


def test_a_text_init_is_peft_s_text_init_on_the_bundle_s_own_embeddings(bundles, model_dirs):
    # "w5" is 3 tokens with [CLS] and [SEP]: repeated, then cut to the 4 virtual tokens, as PEFT does
    bundle = bundles("bert", "int8", **BERT_TEXT_PROMPT)
    ours = with_text_init(bundle, delta_from_init(bundle.manifest, 0)).tensors[slot_name(PROMPT_MODULE, PROMPT)]
    cfg = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                             prompt_tuning_init_text="w5", tokenizer_name_or_path=str(model_dirs("bert")))
    peft = get_peft_model(torch_reference.load_hf(model_dirs("bert"), bundle), cfg)
    np.testing.assert_array_equal(ours, peft.prompt_encoder["default"].embedding.weight.detach().numpy())


def test_a_prompted_lm_s_evaluation_loss_is_peft_s_loss_without_the_first_token_s_term(bundles, model_dirs, tmp_path):
    # model.onnx outputs the user's positions only, so the last virtual token's prediction of token 0 is not there:
    # evaluate() scores tokens 1.. (runtime/evaluate.py says so); PEFT's position V-1+t is the state predicting token t
    import torch

    from edgepeft.runtime.data import load_dataset
    from edgepeft.runtime.evaluate import evaluate
    from edgepeft.runtime.lm_targets import LOSS_MASK
    from edgepeft.runtime.text import load_tokenizer
    from synthetic_tasks import pattern_lines, write_lines

    bundle = bundles("llama", "none", **LLAMA_PROMPT)
    v = LLAMA_PROMPT["method_config"]["num_virtual_tokens"]
    delta = perturbed(bundle.manifest, 3)
    data = load_dataset(write_lines(tmp_path / "val.txt", pattern_lines(5, 2)), bundle.manifest, load_tokenizer(bundle))
    got = evaluate(Predictor(bundle), data, [delta])["loss"]
    model, _ = torch_reference.with_deltas(torch_reference.load_hf(model_dirs("llama"), bundle), bundle, delta.tensors)
    nll = {"from token 1": 0.0, "token 0": 0.0}
    count = {"from token 1": 0, "token 0": 0}
    for i in range(len(data)):
        b = data.batch(np.array([i]))
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(b["input_ids"]), attention_mask=torch.from_numpy(b["attention_mask"])).logits
        logp = torch.log_softmax(logits[0].double(), -1).numpy()  # (V + T, vocab)
        ids, w = b["input_ids"][0], b[LOSS_MASK][0]
        for t in range(len(ids)):
            key = "token 0" if t == 0 else "from token 1"
            nll[key] -= w[t] * logp[v - 1 + t, ids[t]]
            count[key] += int(w[t])
    assert got == pytest.approx(nll["from token 1"] / count["from token 1"], rel=1e-4)
    assert count["token 0"] == len(data)  # the left-out term is one target per example, and it is not negligible:
    full = (nll["from token 1"] + nll["token 0"]) / (count["from token 1"] + count["token 0"])
    assert abs(full - got) > 1e-3
