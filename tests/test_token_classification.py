"""Token classification (a BIO tag per word): reading and aligning the data, training on the device, metrics,
tagging, and refusing heads the exporter cannot export. Output and gradient parity with HF
AutoModelForTokenClassification + PEFT is in the method table (tests/test_methods_table.py, "bert-token" rows)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepeft.errors import DataError, ExportError
from edgepeft.names import IGNORED_LABEL
from edgepeft.runtime.data import load_dataset
from edgepeft.runtime.evaluate import evaluate, token_f1
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.text import load_tokenizer
from edgepeft.runtime.token_data import align
from edgepeft.runtime.trainer import TrainConfig, Trainer
from synthetic_tasks import write_jsonl

TAGS = {0: "O", 1: "B-PER", 2: "B-LOC"}  # the tag of a word is its group: w0-3, w4-7, w8-11


def tagged_rows(n: int, seed: int) -> list[dict]:
    """Sentences of 4-10 words, each tagged by its group; some words are two tokens ("w3.w7": w3 . w7)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        ks = rng.integers(12, size=int(rng.integers(4, 11)))  # 12 words: separable by a head on 32-wide states
        words = [f"w{k}" if rng.random() < 0.8 else f"w{k}.w{int(rng.integers(90))}" for k in ks]
        rows.append({"tokens": words, "labels": [TAGS[int(k) // 4] for k in ks]})
    return rows


@pytest.fixture(scope="module")
def tagger(bundles, tmp_path_factory):
    """(bundle, train, val) of the tiny BERT token classifier (the table's bert-token bundle)."""
    b = bundles("bert-token", "int8", method="lora+bitfit")
    root = tmp_path_factory.mktemp("tags")
    tok = load_tokenizer(b)
    return (b, load_dataset(write_jsonl(root / "train.jsonl", tagged_rows(300, 1)), b.manifest, tok),
            load_dataset(write_jsonl(root / "val.jsonl", tagged_rows(60, 2)), b.manifest, tok))


def test_a_words_label_goes_on_its_first_token_and_nowhere_else():
    # [CLS] John lives in New-York [SEP]: word 3 is two tokens
    assert align([None, 0, 1, 2, 3, 3, None], [1, 0, 0, 3]) == [IGNORED_LABEL, 1, 0, 0, 3, IGNORED_LABEL, IGNORED_LABEL]


def test_jsonl_rows_with_tokens_or_text_read_to_aligned_token_labels(tagger, tmp_path):
    b = tagger[0]
    path = write_jsonl(tmp_path / "d.jsonl", [{"tokens": ["w1", "w2.w3", "w40"], "labels": ["O", "B-PER", 3]},
                                              {"text": "w4  w61", "labels": ["O", "B-LOC"]}])
    d = load_dataset(path, b.manifest, load_tokenizer(b))
    labels = list(b.manifest.labels)
    # [CLS] w1 w2 . w3 w40 [SEP]: the second word is three tokens, labelled on the first
    assert d.token_labels[0] == [IGNORED_LABEL, 0, labels.index("B-PER"), IGNORED_LABEL, IGNORED_LABEL, 3, IGNORED_LABEL]
    assert d.token_labels[1] == [IGNORED_LABEL, 0, labels.index("B-LOC"), IGNORED_LABEL]
    batch = d.batch([0, 1])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][1, 4:] == IGNORED_LABEL).all()  # padding carries no label


@pytest.mark.parametrize("row, message", [
    ({"tokens": ["w1", "w2"], "labels": ["O"]}, "1 labels for 2 words"),
    ({"tokens": ["w1"], "labels": ["B-ORG"]}, "unknown label 'B-ORG'"),
    ({"tokens": ["w1"]}, "'labels' must be a list"),
    ({"labels": ["O"]}, "expected"),
])
def test_a_bad_token_row_is_refused_naming_its_line(tagger, tmp_path, row, message):
    b = tagger[0]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"tokens": ["w1"], "labels": ["O"]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message) as e:
        load_dataset(path, b.manifest, load_tokenizer(b))
    assert f"{path}:2:" in str(e.value)


def test_token_f1_leaves_out_the_outside_label():
    o, per, loc = 0, 1, 2
    gold = np.array([o, per, per, loc])
    pred = np.array([o, per, o, per])
    # precision 1/2 (two non-O predictions, one right), recall 1/3 (three non-O gold tags): F1 = 0.4
    assert token_f1(pred, gold, outside=o) == pytest.approx(0.4)
    assert token_f1(pred, gold, outside=None) == pytest.approx(0.5)  # no O label: token accuracy


def test_tiny_bert_learns_to_tag_words_on_an_int4_base(tagger, bundles):
    _, train, val = tagger  # same tokenizer and labels: the data read for the int8 bundle is the int4 bundle's
    b = bundles("bert-token", "int4", method="lora+bitfit")
    r = Trainer(b, train, TrainConfig(epochs=6, lr=3e-2, batch_size=16), val=val).fit()
    assert r.summary.before["accuracy"] < 0.6
    assert r.summary.after["accuracy"] >= 0.9
    assert r.summary.after["f1"] >= 0.9
    again = evaluate(Predictor(b), val, [r.delta])
    assert again["accuracy"] == pytest.approx(r.summary.after["accuracy"])
    assert again["tokens"] == sum(int((np.array(t) != IGNORED_LABEL).sum()) for t in val.token_labels)


def test_tag_gives_each_word_the_label_of_its_first_token(tagger):
    b = tagger[0]
    p = Predictor(b)
    text = "w1 w2.w3 w40"
    (tagged,) = p.tag([text])
    ids = load_tokenizer(b).encode(text.split(), is_pretokenized=True).ids
    logits = p.logits(np.array([ids]), np.ones((1, len(ids)), np.int64))[0]
    assert [w for w, _ in tagged] == ["w1", "w2.w3", "w40"]
    assert [l for _, l in tagged] == [b.manifest.labels[int(logits[t].argmax())] for t in (1, 2, 5)]


@pytest.mark.parametrize("arch, task", [("BertForQuestionAnswering", "question-answering"),
                                        ("BertForMaskedLM", "fill-mask")])
def test_an_unsupported_head_is_refused_before_weights_load(arch, task, model_dirs, tmp_path):
    # config.json and tokenizer only: no weights to load, so the refusal cannot come from loading them
    from edgepeft.exporters.export import export_bundle

    src = model_dirs("bert")
    model = tmp_path / "qa"
    model.mkdir()
    config = json.loads((src / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
    with pytest.raises(ExportError, match=f"{arch} is a {task} model") as e:
        export_bundle(model, tmp_path / "out")
    assert "supports: sequence-classification, token-classification" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_the_cli_trains_evaluates_and_tags_a_token_classifier(tagger, tmp_path, capsys):
    from cli_helpers import run_cli

    b = tagger[0]
    train = write_jsonl(tmp_path / "train.jsonl", tagged_rows(200, 3))
    val = write_jsonl(tmp_path / "val.jsonl", tagged_rows(40, 4))
    out = tmp_path / "tags.delta"
    r = run_cli(capsys, "train", b.path, "--data", train, "--val", val, "-o", out, "--epochs", "6", "--lr", "3e-2")
    assert r.code == 0, r.err
    r = run_cli(capsys, "eval", b.path, "--data", val, "--delta", out)
    metrics = dict(line.split() for line in r.out.splitlines())
    assert r.code == 0 and float(metrics["accuracy"]) >= 0.9 and float(metrics["f1"]) >= 0.9, r.out + r.err
    r = run_cli(capsys, "infer", b.path, "--delta", out, "w1 w5 w9")
    assert r.code == 0 and r.out.strip() == "w1/O w5/B-PER w9/B-LOC", r.out + r.err
