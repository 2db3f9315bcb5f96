"""One table of cases (family x method x quantization) that every generic method test runs over.

Adding a method or a model family adds rows here, not tests. References are HF + PEFT on the bundle's own (dequantized)
weights (tests/torch_reference.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

import torch_reference
from peft import PeftModel
from edgepeft.delta import delta_from_init
from edgepeft.delta.format import Delta, load_delta, save_delta
from edgepeft.delta.transport import error_bound, pack, unpack
from edgepeft.delta.merge import merge
from edgepeft import methods
from edgepeft.delta.peft_format import from_peft, to_peft
from edgepeft.errors import DeltaError
from edgepeft.runtime.lm_targets import first_target, loss_chunks, train_feeds
from edgepeft.names import ATTENTION_MASK, CLASSIFICATION_TASKS, IGNORED_LABEL, INPUT_IDS, LABELS, LOSS, SEQ_CLS, TOKEN_CLS, grad_name
from edgepeft.runtime.adapters import AdapterPool
from edgepeft.runtime.data import load_dataset
from edgepeft.runtime.infer import Predictor
from edgepeft.runtime.trainer import TrainConfig, Trainer
from edgepeft.runtime.weights import bundle_base_weights, read_frozen

CASES = [  # (family, method, quantization[, method options])
    ("bert", "lora+bitfit", "none"),
    ("llama", "lora", "int8"),
    ("bert", "ia3", "none"),
    ("bert", "ia3", "int8"),
    ("llama", "ia3", "none"),
    ("llama", "ia3", "int8"),
    # --- methods2 (DoRA) ---
    ("bert", "dora", "none"),
    ("bert", "dora", "int8"),
    ("llama", "dora", "none"),
    ("llama", "dora", "int8"),
    # methods3: VeRA, the r x r core (LoRA-XS), bottleneck adapters
    ("bert", "vera", "none"),
    ("bert", "vera", "int8"),
    ("llama", "vera", "none"),
    ("llama", "vera", "int8"),
    ("bert", "loraxs", "none"),
    ("bert", "loraxs", "int8"),
    ("llama", "loraxs", "none"),
    ("llama", "loraxs", "int8"),
    ("bert", "bottleneck", "none", {"placement": "houlsby", "non_linearity": "gelu"}),
    ("bert", "bottleneck", "int8"),  # pfeiffer, relu: the defaults
    ("llama", "bottleneck", "none", {"placement": "houlsby", "non_linearity": "silu", "reduction_factor": 4}),
    ("llama", "bottleneck", "int8"),
    # issue 14: AdaLoRA (the reference's loss is PEFT's own, its orthogonality term included)
    ("bert", "adalora", "none", {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2}),
    ("llama", "adalora", "int8", {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2}),
    # issue 14: virtual tokens (each method on both families, fp32 on one and int8 on the other)
    ("bert", "prompt", "int8", {"num_virtual_tokens": 4, "init": "text", "init_text": "w5"}),
    ("llama", "prompt", "none", {"num_virtual_tokens": 4}),
    ("bert", "ptuning", "none", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    ("llama", "ptuning", "int8", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    ("bert", "prefix", "none", {"num_virtual_tokens": 4, "projection": True, "encoder_hidden_size": 16}),
    ("llama", "prefix", "int8", {"num_virtual_tokens": 4}),
]
# Every family the exporter accepts (exporters/architectures.py), fp32 / int8 / int4, with its default method;
# GPT-2 (Conv1D, weights stored (in, out)) with each method that applies. int8 / int4 rows compare against
# HF + PEFT on the bundle's own dequantized weights, so the tolerance stays tight. One export writes all three.
FAMILY_METHODS = [("bert", "lora+bitfit"), ("roberta", "lora+bitfit"), ("xlm-roberta", "lora+bitfit"),
                  ("electra", "lora+bitfit"), ("distilbert", "lora+bitfit"), ("llama", "lora"), ("mistral", "lora"),
                  ("qwen2", "lora"), ("gpt2", "lora"), ("gpt2", "ia3"), ("gpt2", "bitfit")]
CASES += [(f, m, q) for f, m in FAMILY_METHODS for q in ("none", "int8", "int4") if (f, m, q) not in CASES]
# Token classification (tiny_models' "<family>-token": a ForTokenClassification checkpoint; the task is inferred from it).
CASES += [("bert-token", "lora+bitfit", q) for q in ("none", "int8", "int4")]
CASES += [("distilbert-token", "lora+bitfit", q) for q in ("none", "int8", "int4")]  # the distilbert family's second task
CASES += [("roberta-token", "lora+bitfit", "int8")]  # another head layout of the bert family
IDS = ["-".join([f, m, q, *(f"{k}={v}" for k, v in (o[0] if o else {}).items())]) for f, m, q, *o in CASES]


def perturbed(manifest, seed: int) -> Delta:
    """A trained-looking delta: every slot its start value plus noise (B and scales included)."""
    d = delta_from_init(manifest, seed)
    rng = np.random.default_rng(seed + 100)
    t = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in d.tensors.items()}
    return Delta(t, d.meta)


def batch(manifest, b: int, t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, manifest.vocab_size, size=(b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    mask[0, t - 2:] = 0
    if manifest.task == TOKEN_CLS:  # a tag per token; the first token (a special one) and padding carry none
        labels = rng.integers(0, len(manifest.labels), size=(b, t)).astype(np.int64)
        labels[:, 0] = IGNORED_LABEL
        labels[mask == 0] = IGNORED_LABEL
    else:
        labels = rng.integers(0, max(1, len(manifest.labels)), size=(b,)).astype(np.int64)
    return ids, mask, labels


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def compared(x: np.ndarray, mask: np.ndarray, task: str) -> np.ndarray:
    return x if task == SEQ_CLS else x[mask.astype(bool)]  # padded LM positions are not compared


def bundle_of(bundles, row: tuple):
    family, method, quant, *opts = row
    return bundles(family, quant, method=method, **({"method_config": opts[0]} if opts else {}))


def mixable(method: str) -> bool:
    return all(m.mixable for m in methods.parse(method))


@pytest.fixture(params=CASES, ids=IDS)
def case(request, bundles, model_dirs):
    return request.param[0], bundle_of(bundles, request.param), model_dirs(request.param[0])


@pytest.fixture(params=[c for c in CASES if mixable(c[1])], ids=[i for c, i in zip(CASES, IDS) if mixable(c[1])])
def mixable_case(request, bundles, model_dirs):
    return request.param[0], bundle_of(bundles, request.param), model_dirs(request.param[0])


def exact_mean(method: str) -> bool:
    return all(m.exact_mean for m in methods.parse(method))


@pytest.fixture(params=[c for c in CASES if exact_mean(c[1])], ids=[i for c, i in zip(CASES, IDS) if exact_mean(c[1])])
def exact_mean_case(request, bundles, model_dirs):
    return request.param[0], bundle_of(bundles, request.param), model_dirs(request.param[0])


@pytest.fixture(params=[c for c in CASES if not mixable(c[1])], ids=[i for c, i in zip(CASES, IDS) if not mixable(c[1])])
def unmixable_case(request, bundles):
    return bundle_of(bundles, request.param)


def test_inference_matches_torch_peft(case):
    family, bundle, model_dir = case
    m = bundle.manifest
    delta = perturbed(m, 1)
    ids, mask, _ = batch(m, 3, 9)
    ours = Predictor(bundle).logits(ids, mask, [delta])
    ref, _ = torch_reference.with_deltas(torch_reference.load_hf(model_dir, bundle), bundle, delta.tensors)
    theirs = torch_reference.logits(ref, ids, mask)
    assert rel(compared(ours, mask, m.task), compared(theirs, mask, m.task)) < 1e-4


def test_no_delta_is_the_base_model(case):
    family, bundle, model_dir = case
    m = bundle.manifest
    ids, mask, _ = batch(m, 2, 7)
    ours = Predictor(bundle).logits(ids, mask)
    base = torch_reference.logits(torch_reference.load_hf(model_dir, bundle), ids, mask)
    assert np.abs(compared(ours, mask, m.task) - compared(base, mask, m.task)).max() < 1e-5


def test_train_step_gradients_match_torch_peft(case):
    family, bundle, model_dir = case
    m = bundle.manifest
    delta = perturbed(m, 3)
    ref, params = torch_reference.with_deltas(torch_reference.load_hf(model_dir, bundle), bundle, delta.tensors)
    ids, mask, labels = batch(m, 3, 8, seed=5)
    feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask, **delta.tensors}
    sess = bundle.session("train")
    if m.task in CLASSIFICATION_TASKS:
        feeds[LABELS] = labels
    else:  # the graph scores the positions the runtime hands it: here every real token, as HF's loss does
        feeds.update(train_feeds(feeds, loss_chunks(sess), first_target(m)))
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    loss, grads = torch_reference.loss_and_grads(ref, params, m.task, ids, mask, labels)
    assert abs(float(outs[LOSS]) - loss) <= 1e-4 * abs(loss)
    for s in m.slots:
        assert rel(outs[grad_name(s.name)], grads[s.name].reshape(s.shape)) < 1e-4, s.name


def test_a_mix_of_two_deltas_equals_their_weighted_merge(mixable_case):
    # The inference mix and the hub's aggregation agree: mixing {a: 0.3, b: 0.7} in one call gives the
    # logits of the weighted mean taken in the method's own space (exact: rank a + rank b keeps ΔW).
    family, bundle, model_dir = mixable_case
    m = bundle.manifest
    a, b = perturbed(m, 7), perturbed(m, 8)
    ids, mask, _ = batch(m, 2, 6)
    p = Predictor(bundle)
    merged, _ = merge([a, b], [0.3, 0.7], rank=2 * max(a.meta.rank, 1), scale=a.scale, base=bundle_base_weights(bundle))
    mixed = p.logits(ids, mask, [a, b], [0.3, 0.7])
    assert rel(compared(mixed, mask, m.task), compared(p.logits(ids, mask, [merged]), mask, m.task)) < 1e-4


def test_the_weighted_merge_is_the_weighted_mean_of_the_dense_models(exact_mean_case):
    # The hub's mean in each method's own space equals the mean of what PEFT merges into the weights
    # (merge_and_unload), DoRA's magnitude included; exact at rank a + rank b.
    family, bundle, model_dir = exact_mean_case
    m = bundle.manifest
    a, b = perturbed(m, 7), perturbed(m, 8)
    merged, _ = merge([a, b], [0.3, 0.7], rank=2 * max(a.meta.rank, 1), scale=a.scale, base=bundle_base_weights(bundle))
    da, db, dm = (torch_reference.dense_state(model_dir, bundle, d.tensors) for d in (a, b, merged))
    for k in dm:
        assert rel(dm[k], 0.3 * da[k] + 0.7 * db[k]) < 1e-5, k


def test_peft_round_trip_loads_in_peft_with_our_logits(case, tmp_path):
    # to-peft writes what PeftModel.from_pretrained loads with our logits; from-peft reads it back to the same delta.
    # A method PEFT does not have refuses in one line.
    family, bundle, model_dir = case
    m = bundle.manifest
    delta = perturbed(m, 11)
    base = read_frozen(bundle)
    if not any(meth.peft_keys or meth.virtual for meth in methods.parse(m.method)):  # virtual: PEFT's prompt learning
        with pytest.raises(DeltaError, match="no PEFT adapter equivalent") as e:
            to_peft(delta, m, tmp_path / "peft", base_weights=base)
        assert "\n" not in str(e.value)
        return
    to_peft(delta, m, tmp_path / "peft", base_weights=base)
    model = PeftModel.from_pretrained(torch_reference.load_hf(model_dir, bundle), tmp_path / "peft").eval()
    ids, mask, _ = batch(m, 2, 7)
    ours = Predictor(bundle).logits(ids, mask, [delta])
    assert rel(compared(ours, mask, m.task), compared(torch_reference.logits(model, ids, mask), mask, m.task)) < 1e-4
    if sum(methods.owner(s.kind).virtual is not None for s in m.slots) > 1:  # PEFT keeps a prompt encoder's output only
        with pytest.raises(DeltaError, match="holds only the encoder's output") as e:
            from_peft(tmp_path / "peft", m, base_weights=base)
        assert "\n" not in str(e.value)
        return
    back = from_peft(tmp_path / "peft", m, base_weights=base)
    assert set(back.tensors) == set(delta.tensors)
    for k, t in delta.tensors.items():
        assert rel(back.tensors[k], t) < 1e-5, k


def task_rows(manifest, n: int, seed: int) -> list[dict]:
    """Training rows of the bundle's task over the tiny models' vocabulary (random words and labels)."""
    rng, labels = np.random.default_rng(seed), manifest.labels
    words = [[f"w{i}" for i in rng.integers(0, 90, rng.integers(3, 7))] for _ in range(n)]
    if manifest.task == TOKEN_CLS:
        return [{"tokens": w, "labels": [labels[j] for j in rng.integers(0, len(labels), len(w))]} for w in words]
    if manifest.task == SEQ_CLS:
        return [{"text": " ".join(w), "label": labels[rng.integers(0, len(labels))]} for w in words]
    return [{"text": " ".join(w)} for w in words]


def test_the_device_trainer_trains_it_and_the_delta_travels_to_the_adapter_pool(case, tmp_path):
    # The device path end to end: the trainer moves every trainable slot off its start, the delta saved and
    # packed for the wire comes back within the packing's bound, and the pool serves the file with its logits.
    family, bundle, model_dir = case
    m = bundle.manifest
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in task_rows(m, 8, seed=1)))
    # The checkpoint's own word-level tokenizer.json: transformers loads a tiny qwen2's as a Qwen2Tokenizer, which
    # rebuilds it as byte-level BPE and drops every word, so the bundle's copy of it would leave no tokens to train on.
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=m.max_length)
    data = load_dataset(rows, m, tok)
    # 4 steps: AdaLoRA's rows prune on a schedule (tinit 1 + tfinal 2) that needs more steps than it spans
    trained = Trainer(bundle, data, TrainConfig(epochs=2, max_steps=4, batch_size=4, lr=1e-2, checkpoint_every=0)).fit()
    assert trained.summary.steps == 4
    start = delta_from_init(m, 0)
    frozen = {s.name for s in m.slots if s.name not in trained.delta.tensors}
    assert not frozen, f"slots missing from the trained delta: {sorted(frozen)}"
    assert not [k for k, v in trained.delta.tensors.items() if np.array_equal(v, start.tensors[k])], "slots the trainer never moved"
    save_delta(tmp_path / "d.safetensors", trained.delta)
    wire = unpack(pack(load_delta(tmp_path / "d.safetensors", m)), manifest=m)
    bound = error_bound(trained.delta)
    for k, v in trained.delta.tensors.items():
        assert np.abs(wire.tensors[k] - v).max() <= bound, k
    pool = AdapterPool(bundle)
    pool.add("mine", tmp_path / "d.safetensors")
    ids, mask, _ = batch(m, 2, 6)
    np.testing.assert_array_equal(pool.logits(ids, mask, "mine"), Predictor(bundle).logits(ids, mask, [trained.delta]))


def test_a_mix_is_refused_in_one_line_where_the_method_has_no_exact_mix(unmixable_case):
    m = unmixable_case.manifest
    a, b = perturbed(m, 7), perturbed(m, 8)
    ids, mask, _ = batch(m, 2, 6)
    with pytest.raises(DeltaError, match="cannot be mixed") as e:
        Predictor(unmixable_case).logits(ids, mask, [a, b], [0.3, 0.7])
    assert "\n" not in str(e.value)


def test_every_model_type_the_exporter_accepts_is_proven_here_at_every_quantization():
    # A model type the exporter accepts has rows here (fp32, int8, int4), or it is not accepted; a family's other
    # tasks have rows on its first model type (token classification: "bert-token").
    from edgepeft.exporters.architectures import FAMILIES

    rows = {(f, q) for f, _, q, *_ in CASES}
    for fam in FAMILIES:
        for t in fam.model_types:
            assert all((t, q) in rows for q in ("none", "int8", "int4")), t
        for task in fam.tasks[1:]:
            assert task == TOKEN_CLS and all((f"{fam.model_types[0]}-token", q) in rows for q in ("none", "int8", "int4"))
    assert {t for fam in FAMILIES for t in fam.model_types} == {f.removesuffix("-token") for f, _ in rows}
