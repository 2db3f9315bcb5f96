"""`edgepeft chat` and `edgepeft infer` on a causal LM: what a person typing sees."""

from __future__ import annotations

import io

import pytest

from cli_helpers import error_lines, run_cli
from edgepeft.runtime.chat_data import load_chat_template, render
from edgepeft.runtime.generate import Generator, Sampling
from edgepeft.runtime.infer import Predictor


def test_chat_replies_to_each_stdin_line_with_what_the_generator_gives(capsys, monkeypatch, bundles):
    b = bundles("llama")
    monkeypatch.setattr("sys.stdin", io.StringIO("w5 w6\nw7\n"))
    r = run_cli(capsys, "chat", b.path, "--temperature", "0", "--max-new-tokens", "6")
    assert r.code == 0, r.err
    gen = Generator(Predictor(b))
    pieces = load_chat_template(b.path, b.manifest)
    first = [{"role": "user", "content": "w5 w6"}]
    ids = gen.tokenizer.encode(render(pieces, first, generation=True), add_special_tokens=False).ids
    reply = "".join(gen.stream(ids, Sampling(max_new_tokens=6)))
    lines = r.out.splitlines()
    assert len(lines) == 2 and lines[0] == reply


@pytest.mark.parametrize("option, value", [("--temperature", "-1"), ("--top-p", "0"), ("--top-k", "-3")])
def test_generation_options_out_of_range_are_one_line_errors_naming_the_option(option, value, capsys, bundles):
    r = run_cli(capsys, "infer", bundles("llama").path, "w5 w6", option, value)
    errors = [l for l in error_lines(r) if l.startswith("Error:")]  # click adds its "Usage: ..." hint above
    assert r.code == 2 and len(errors) == 1 and option in errors[0]


def test_infer_continues_a_text_greedily_by_default(capsys, bundles):
    b = bundles("llama")
    r = run_cli(capsys, "infer", b.path, "w5 w6", "--max-new-tokens", "5")
    assert r.code == 0, r.err
    assert r.out == "w5 w6 " + Predictor(b).generate("w5 w6", 5) + "\n"


def test_chat_on_a_bundle_without_a_chat_template_says_to_use_infer(capsys, monkeypatch, bundles):
    monkeypatch.setattr("sys.stdin", io.StringIO("w5\n"))
    r = run_cli(capsys, "chat", bundles("gpt2").path)
    assert r.code == 1 and "no chat template" in r.err and "edgepeft infer" in r.err
