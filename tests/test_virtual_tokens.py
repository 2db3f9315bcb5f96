"""What is particular to virtual-token methods (prompt, ptuning, prefix) beyond the generic table:
the room they take from --max-length, and a causal LM's cache carrying them after the first call."""

from __future__ import annotations

import numpy as np

from cli_helpers import error_lines, run_cli
from test_methods_table import perturbed
from edgepeft.runtime.generate import Generator, Sampling
from edgepeft.runtime.infer import Predictor

LLAMA_PROMPT = dict(method="prompt", method_config={"num_virtual_tokens": 4})  # a row of the table: exported once


def test_more_virtual_tokens_than_max_length_leaves_room_for_is_one_line_and_writes_nothing(capsys, model_dirs, tmp_path):
    out = tmp_path / "b"
    r = run_cli(capsys, "export", model_dirs("bert"), out, "--method", "prompt", "--method-config",
                "num_virtual_tokens=16", "--max-length", "16")
    assert r.code != 0
    lines = error_lines(r)
    assert len(lines) == 1 and "--max-length 16" in lines[0] and "num_virtual_tokens" in lines[0], r.err
    assert not out.exists()


def test_virtual_tokens_take_their_positions_from_the_users_tokens(bundles):
    m = bundles("llama", "none", **LLAMA_PROMPT).manifest
    assert m.max_length == 64 - 4  # the tiny Llama has 64 positions; the runtime truncates the user's text to the rest
    assert m.extra["context_length"] == 64 - 4


def test_generation_feeds_the_prompt_once_and_matches_full_forwards(bundles):
    # The cached path feeds the prompt on the first call only (the cache holds it after); every token it picks is
    # the greedy choice of a full forward over prompt + text so far.
    bundle = bundles("llama", "none", **LLAMA_PROMPT)
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
