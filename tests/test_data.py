"""Data files: formats, labels by name or index, bad rows named by file and line, seeded length-bucketed batches."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from edgepeft.errors import DataError
from edgepeft.manifest import Manifest
from edgepeft.names import CAUSAL_LM, SEQ_CLS
from edgepeft.runtime.data import load_dataset, plan_batches, read_rows, split_by_tokens

LABELS = ("neg", "pos", "7")  # "7" is a label *name*: names win over indices


def manifest(task: str = SEQ_CLS) -> Manifest:
    return Manifest(fingerprint="0" * 64, source="t", architecture="T", model_type="bert", task=task, method="lora",
                    quantization="none", max_length=8, vocab_size=20, pad_token_id=0, slots=(), graphs={},
                    labels=LABELS if task == SEQ_CLS else ())


def tokenizer() -> Tokenizer:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(18)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_truncation(max_length=8)
    return tok


def write(tmp_path, name: str, content: str | bytes):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def test_jsonl_labels_by_name_and_by_index_give_the_same_indices(tmp_path):
    p = write(tmp_path, "d.jsonl", '{"text": "w1 w2", "label": "pos"}\n\n{"text": "w3", "label": 1}\n'
                                   '{"text": "w4", "label": "7"}\n{"text": "w5", "label": 2}\n')
    rows = read_rows(p, manifest())
    assert [r.label for r in rows] == [1, 1, 2, 2]
    assert [r.line for r in rows] == [1, 3, 4, 5]


def test_csv_with_header_reads_quoted_commas_and_reorders_columns(tmp_path):
    p = write(tmp_path, "d.csv", 'id,label,text\n1,neg,"w1, w2"\n2,0,w3\n')
    rows = read_rows(p, manifest())
    assert [(r.text, r.label, r.line) for r in rows] == [("w1, w2", 0, 2), ("w3", 0, 3)]


def test_plain_text_is_one_example_per_line_for_a_causal_lm(tmp_path):
    p = write(tmp_path, "d.txt", "w1 w2\n\nw3 w4 w5\n")
    rows = read_rows(p, manifest(CAUSAL_LM))
    assert [(r.text, r.line) for r in rows] == [("w1 w2", 1), ("w3 w4 w5", 3)]


BAD = [  # (file name, content, task, message fragment, line)
    ("d.jsonl", '{"text": "w1", "label": "pos"}\n{"text": "w2", "label": "maybe"}\n', SEQ_CLS, "unknown label 'maybe'", 2),
    ("d.jsonl", '{"text": "w1", "label": 3}\n', SEQ_CLS, "label index 3 is out of range", 1),
    ("d.jsonl", '{"text": "w1", "label": true}\n', SEQ_CLS, "not a label name or index", 1),
    ("d.jsonl", '{"text": "w1", "label": 0}\n{"text": "w1", "label": 0\n', SEQ_CLS, "not valid JSON", 2),
    ("d.jsonl", '{"label": 0}\n', SEQ_CLS, "with a 'text' key", 1),
    ("d.jsonl", '{"text": "w1"}\n', SEQ_CLS, "no label", 1),
    ("d.jsonl", '{"text": "  ", "label": 0}\n', SEQ_CLS, "empty text", 1),
    ("d.jsonl", '{"text": 5, "label": 0}\n', SEQ_CLS, "'text' must be a string", 1),
    ("d.csv", 'text,label\nw1,pos\n"w2\nw3",neg\nw4,bad\n', SEQ_CLS, "unknown label 'bad'", 5),
    ("d.csv", 'text,label\nw1,pos,extra\n', SEQ_CLS, "3 fields, the header has 2", 2),
    ("d.csv", 'sentence,label\nw1,pos\n', SEQ_CLS, "the header must name the columns text,label", 1),
    ("d.jsonl", b'{"text": "w1", "label": 0}\n{"text": "\xff", "label": 0}\n', SEQ_CLS, "not valid UTF-8", 2),
]


@pytest.mark.parametrize("name,content,task,fragment,line", BAD, ids=[f"{b[3]}" for b in BAD])
def test_a_bad_row_is_a_data_error_naming_file_and_line(tmp_path, name, content, task, fragment, line):
    p = write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        read_rows(p, manifest(task))
    assert f"{p}:{line}:" in str(e.value) and fragment in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,content,task,fragment", [
    ("d.jsonl", "", SEQ_CLS, "no examples"),
    ("d.txt", "\n\n", CAUSAL_LM, "no examples"),
    ("d.txt", "w1\n", SEQ_CLS, "plain text has no labels"),
    ("d.parquet", "x", SEQ_CLS, "unknown data format"),
])
def test_an_unusable_file_is_a_data_error_naming_the_file(tmp_path, name, content, task, fragment):
    p = write(tmp_path, name, content)
    with pytest.raises(DataError, match=fragment) as e:
        read_rows(p, manifest(task))
    assert str(p) in str(e.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_rows(tmp_path / "none.jsonl", manifest())


def test_a_one_token_text_cannot_train_a_language_model(tmp_path):
    p = write(tmp_path, "d.txt", "w1 w2\nw3\n")
    with pytest.raises(DataError, match=rf"{p}:2: text is one token"):
        load_dataset(p, manifest(CAUSAL_LM), tokenizer())


def test_batches_pad_to_the_longest_sequence_of_each_batch(tmp_path):
    p = write(tmp_path, "d.jsonl", "".join(f'{{"text": "{" ".join(["w1"] * n)}", "label": 0}}\n' for n in (1, 3, 2, 7)))
    ds = load_dataset(p, manifest(), tokenizer())
    b = ds.batch([0, 2])
    assert b["input_ids"].shape == (2, 2) and b["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert ds.batch([3, 1])["input_ids"].shape == (2, 7)
    assert ds.batch([3], max_length=4)["input_ids"].shape == (1, 4)


def test_batch_plan_covers_every_example_once_and_repeats_with_its_seed():
    lengths = np.random.default_rng(0).integers(1, 60, size=1003)
    a = plan_batches(lengths, 16, np.random.default_rng(5))
    b = plan_batches(lengths, 16, np.random.default_rng(5))
    c = plan_batches(lengths, 16, np.random.default_rng(6))
    assert sorted(np.concatenate(a).tolist()) == list(range(1003))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_length_bucketing_pads_far_less_than_random_batches():
    lengths = np.random.default_rng(0).integers(1, 60, size=4000)

    def padding(batches):
        return sum(int(lengths[i].max() * len(i) - lengths[i].sum()) for i in batches)

    bucketed = plan_batches(lengths, 16, np.random.default_rng(1))
    random = plan_batches(lengths, 16, np.random.default_rng(1), bucket_batches=0)  # chunks of one batch: no bucketing
    assert padding(bucketed) < 0.2 * padding(random)
    # batch order is still shuffled: lengths do not grow monotonically across the epoch
    firsts = [lengths[i].max() for i in bucketed]
    assert not all(x <= y for x, y in zip(firsts, firsts[1:]))


def test_token_limited_runs_keep_order_and_stay_within_the_limit():
    lengths = np.random.default_rng(4).integers(1, 40, size=300)
    for batch in plan_batches(lengths, 32, np.random.default_rng(5)):
        pieces = split_by_tokens(batch, lengths, 100)
        assert np.array_equal(np.concatenate(pieces), batch)
        for p in pieces:
            assert len(p) == 1 or len(p) * lengths[p].max() <= 100
        # greedy: a piece could not have taken the next example
        for p, q in zip(pieces, pieces[1:]):
            assert (len(p) + 1) * max(lengths[p].max(), lengths[q[0]]) > 100



def test_a_balanced_epoch_draws_every_label_about_equally_from_skewed_rows():
    labels = np.array([0] * 95 + [1] * 5)
    rng = np.random.default_rng(0)
    drawn = np.concatenate([np.concatenate(plan_batches(np.ones(100, np.int64), 16, rng, labels=labels)) for _ in range(50)])
    assert drawn.size == 50 * 100  # an epoch is still one pass's worth of examples
    share = np.mean(labels[drawn] == 1)
    assert 0.45 < share < 0.55  # 5 % of the rows, half of what is drawn
