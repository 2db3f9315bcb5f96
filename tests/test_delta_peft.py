"""PEFT interop against real peft: read what PEFT saves, and have PEFT load what we write."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import peft
import safetensors.numpy
import torch
import transformers

from edgepeft.delta import Delta, DeltaMeta, delta_from_init
from edgepeft.delta.peft_format import CONFIG_FILE, WEIGHTS_FILE, from_peft, to_peft
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest, Slot

FP = "0123456789abcdef" * 4
H, R, ALPHA = 32, 4, 8
TARGETS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


def make_manifest(*, head: bool = True, lora_bias: bool = False, extra_slots: tuple[Slot, ...] = ()) -> Manifest:
    slots = []
    for m in TARGETS:
        slots += [Slot(f"{m}.lora_A", "lora_A", m, (R, H), rank=R, alpha=ALPHA, init="kaiming_uniform"), Slot(f"{m}.lora_B", "lora_B", m, (H, R), rank=R, alpha=ALPHA)]
        if lora_bias:
            slots.append(Slot(f"{m}.bias", "bias", m, (H,)))
    if head:
        slots += [Slot("classifier.weight", "weight", "classifier", (2, H)), Slot("classifier.bias", "bias", "classifier", (2,))]
    return Manifest(
        fingerprint=FP, source="tiny-bert", architecture="BertForSequenceClassification", model_type="bert",
        task="sequence-classification", method="lora+bitfit" if lora_bias else "lora", quantization="none",
        max_length=16, vocab_size=100, pad_token_id=0, slots=tuple(slots) + extra_slots, graphs={},
    )


@pytest.fixture(scope="module")
def base():
    """A tiny BERT classifier and a copy of its weights (PEFT wraps models in place)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=100, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh_base(base):
    model, sd = base
    m = copy.deepcopy(model)
    m.load_state_dict(sd)
    return m


def base_weights(base) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in base[1].items() if k.startswith("classifier.")}


@pytest.fixture(scope="module")
def peft_dir(base, tmp_path_factory):
    """A PEFT adapter saved by PEFT: LoRA B and the classifier copy randomized, as after training."""
    model = peft.get_peft_model(fresh_base(base), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["query", "value"], task_type="SEQ_CLS"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_()
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    return out, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def random_delta(manifest: Manifest, seed: int = 0) -> Delta:
    rng = np.random.default_rng(seed)
    t = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in manifest.slots}
    return Delta(t, DeltaMeta(base_fingerprint=FP, method=manifest.method, rank=R, alpha=ALPHA))


def test_from_peft_reads_peft_lora_weights_and_scale(peft_dir, base):
    adir, sd = peft_dir
    d = from_peft(adir, make_manifest(), base_weights=base_weights(base))
    assert d.scale == ALPHA / R
    for m in TARGETS:
        np.testing.assert_array_equal(d.tensors[f"{m}.lora_A"], sd[f"base_model.model.{m}.lora_A.default.weight"])
        np.testing.assert_array_equal(d.tensors[f"{m}.lora_B"], sd[f"base_model.model.{m}.lora_B.default.weight"])


def test_from_peft_reads_head_as_difference_from_base(peft_dir, base):
    adir, sd = peft_dir
    d = from_peft(adir, make_manifest(), base_weights=base_weights(base))
    full = sd["base_model.model.classifier.modules_to_save.default.weight"]
    np.testing.assert_allclose(d.tensors["classifier.weight"] + base[1]["classifier.weight"].numpy(), full, rtol=1e-6, atol=1e-6)


def test_from_peft_refuses_head_without_base_weights(peft_dir):
    with pytest.raises(DeltaError, match="needs the base weights"):
        from_peft(peft_dir[0], make_manifest())


def test_from_peft_refuses_adapter_tensors_the_bundle_has_no_slot_for(peft_dir, base):
    with pytest.raises(DeltaError, match="no slot in the bundle: base_model.model.classifier.bias"):
        from_peft(peft_dir[0], make_manifest(head=False), base_weights=base_weights(base))


def test_from_peft_accepts_adapter_name_infix_and_no_prefix(peft_dir, base, tmp_path):
    adir, _ = peft_dir
    t = safetensors.numpy.load_file(adir / WEIGHTS_FILE)
    renamed = {}
    for k, v in t.items():
        k = k.removeprefix("base_model.model.")
        k = k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        k = k.replace("classifier.", "classifier.modules_to_save.default.")
        renamed[k] = v
    (tmp_path / CONFIG_FILE).write_text((adir / CONFIG_FILE).read_text())
    safetensors.numpy.save_file(renamed, tmp_path / WEIGHTS_FILE)
    a = from_peft(adir, make_manifest(), base_weights=base_weights(base))
    b = from_peft(tmp_path, make_manifest(), base_weights=base_weights(base))
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_to_peft_then_peft_from_pretrained_reproduces_the_weights(base, tmp_path):
    manifest = make_manifest(lora_bias=True)
    d = random_delta(manifest)
    to_peft(d, manifest, tmp_path / "out", base_weights=base_weights(base))
    model = peft.PeftModel.from_pretrained(fresh_base(base), tmp_path / "out")
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    scaling = d.scale
    for m in TARGETS:
        np.testing.assert_array_equal(sd[f"base_model.model.{m}.lora_A.default.weight"], d.tensors[f"{m}.lora_A"])
        np.testing.assert_array_equal(sd[f"base_model.model.{m}.lora_B.default.weight"], d.tensors[f"{m}.lora_B"])
        np.testing.assert_allclose(sd[f"base_model.model.{m}.lora_B.default.bias"] * scaling, d.tensors[f"{m}.bias"], rtol=1e-6)
        layer = model.get_submodule(f"base_model.model.{m}")
        assert layer.scaling["default"] == pytest.approx(scaling)
    for p in ("weight", "bias"):
        want = base[1][f"classifier.{p}"].numpy() + d.tensors[f"classifier.{p}"]
        np.testing.assert_allclose(sd[f"base_model.model.classifier.modules_to_save.default.{p}"], want, rtol=1e-6)


def test_to_peft_writes_the_config_peft_expects(base, tmp_path):
    manifest = make_manifest()
    to_peft(random_delta(manifest), manifest, tmp_path, base_weights=base_weights(base))
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == ("LORA", "SEQ_CLS", R, ALPHA, "none")
    assert cfg["target_modules"] == sorted(TARGETS) and cfg["modules_to_save"] == ["classifier"]
    assert cfg["base_model_name_or_path"] == "tiny-bert" and cfg["lora_bias"] is False


def test_to_peft_then_from_peft_round_trips(base, tmp_path):
    manifest = make_manifest(lora_bias=True)
    d = random_delta(manifest, seed=3)
    to_peft(d, manifest, tmp_path, base_weights=base_weights(base))
    back = from_peft(tmp_path, manifest, base_weights=base_weights(base))
    assert back.meta.rank == R and back.meta.alpha == ALPHA
    for k in d.tensors:
        np.testing.assert_allclose(back.tensors[k], d.tensors[k], rtol=1e-5, atol=1e-6)


def test_to_peft_refuses_head_without_base_weights(tmp_path):
    manifest = make_manifest()
    with pytest.raises(DeltaError, match="classifier.*needs the base weights"):
        to_peft(random_delta(manifest), manifest, tmp_path)


def test_to_peft_needs_base_weights_for_bias_on_module_without_lora(tmp_path):
    ln = "bert.encoder.layer.0.output.LayerNorm"
    manifest = make_manifest(head=False, extra_slots=(Slot(f"{ln}.bias", "bias", ln, (H,)),))
    with pytest.raises(DeltaError, match=f"'{ln}.bias' is stored whole by PEFT"):
        to_peft(random_delta(manifest), manifest, tmp_path)


def test_to_peft_refuses_a_module_with_both_lora_and_a_full_weight(tmp_path):
    m = TARGETS[0]
    manifest = make_manifest(head=False, extra_slots=(Slot(f"{m}.weight", "weight", m, (H, H)),))
    with pytest.raises(DeltaError, match=f"no PEFT LoRA equivalent: {m}.lora_A"):
        to_peft(random_delta(manifest), manifest, tmp_path)


def test_from_peft_refuses_missing_slots_unless_asked_to_fill(peft_dir, base):
    adir, _ = peft_dir
    manifest = make_manifest(lora_bias=True)
    with pytest.raises(DeltaError, match="nothing for bundle slot.*query.bias.*fill_missing=True"):
        from_peft(adir, manifest, base_weights=base_weights(base))
    d = from_peft(adir, manifest, base_weights=base_weights(base), fill_missing=True)
    assert not d.tensors[f"{TARGETS[0]}.bias"].any()


def test_from_peft_keeps_the_rslora_update(tmp_path):
    manifest = make_manifest(head=False)
    to_peft(random_delta(manifest), manifest, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**cfg, "use_rslora": True}))
    assert from_peft(tmp_path, manifest).scale == pytest.approx(ALPHA / math.sqrt(R))


def test_from_peft_refuses_dora(tmp_path):
    manifest = make_manifest(head=False)
    to_peft(random_delta(manifest), manifest, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(DeltaError, match="use_dora"):
        from_peft(tmp_path, manifest)


def test_from_peft_refuses_pickled_adapter(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(DeltaError, match="pickle"):
        from_peft(tmp_path, make_manifest())


def test_delta_from_init_matches_peft_lora_a_init(base):
    """PEFT inits lora_A with kaiming_uniform_(a=sqrt(5)); its bound is 1/sqrt(in), ours too."""
    gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    assert gain * math.sqrt(3 / H) == pytest.approx(1 / math.sqrt(H))
    model = peft.get_peft_model(fresh_base(base), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["query"]))
    theirs = model.get_submodule(f"base_model.model.{TARGETS[0]}").lora_A["default"].weight.detach().numpy()
    ours = delta_from_init(make_manifest(), 0).tensors[f"{TARGETS[0]}.lora_A"]
    assert np.abs(theirs).max() <= 1 / math.sqrt(H) and np.abs(ours).max() <= 1 / math.sqrt(H)
    assert abs(theirs.std() - ours.std()) < 0.3 * theirs.std()  # both uniform(-b, b): std b/sqrt(3)


# ---- on exported bundles: PEFT's logits against the runtime's, through the CLI ------------------

def _bundle_delta(bundle, seed: int = 0) -> Delta:
    """A delta for ``bundle`` with every slot non-zero (B, BitFit biases and the head too)."""
    d = delta_from_init(bundle.manifest, seed)
    rng = np.random.default_rng(seed + 1)
    return Delta({k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in d.tensors.items()}, d.meta)


def _batch(bundle, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, bundle.manifest.vocab_size, size=(3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    return ids, mask


def _cli(*args: str):
    from click.testing import CliRunner

    from edgepeft.cli import cli

    r = CliRunner().invoke(cli, ["delta", *args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_to_peft_dir_loads_in_peft_with_the_runtime_logits(kind, bundles, model_dirs, tmp_path):
    """bert: LoRA + BitFit (bias='all') + classifier head (modules_to_save); llama: LoRA on a causal LM."""
    import torch_reference

    from edgepeft.delta import save_delta
    from edgepeft.runtime.infer import Predictor

    b = bundles(kind)
    d = _bundle_delta(b)
    save_delta(tmp_path / "d.delta", d)
    _cli("to-peft", str(tmp_path / "d.delta"), "--bundle", str(b.path), "-o", str(tmp_path / "peft"))
    cfg = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert cfg["bias"] == ("all" if kind == "bert" else "none")
    model = peft.PeftModel.from_pretrained(torch_reference.load_hf(model_dirs(kind), b), tmp_path / "peft").eval()
    ids, mask = _batch(b)
    theirs = torch_reference.logits(model, ids, mask)
    ours = Predictor(b).logits(ids, mask, [d])
    keep = mask.astype(bool) if kind == "llama" else slice(None)  # padded LM positions are not compared
    assert np.abs(ours[keep] - theirs[keep]).max() < 1e-4
    base = Predictor(b).logits(ids, mask)
    assert np.abs(base[keep] - theirs[keep]).max() > 1e-2  # the adapter really changes the logits


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peft_trained_lora_converts_to_a_delta_with_peft_logits(kind, bundles, model_dirs, tmp_path):
    """A LoRA (+ classifier for bert) trained a few AdamW steps with PEFT in torch, then ``from-peft``."""
    import torch_reference

    from edgepeft.delta import load_delta
    from edgepeft.runtime.infer import Predictor

    b = bundles(kind)
    lora_slots = [s for s in b.manifest.slots if s.kind == "lora_A"]
    cfg = peft.LoraConfig(r=lora_slots[0].rank, lora_alpha=lora_slots[0].alpha, target_modules=sorted(s.module for s in lora_slots),
                          lora_dropout=0.0, task_type="SEQ_CLS" if kind == "bert" else "CAUSAL_LM")
    torch.manual_seed(0)
    model = peft.get_peft_model(torch_reference.load_hf(model_dirs(kind), b), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = _batch(b, 1)
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    model.train()
    for _ in range(4):
        if kind == "bert":
            loss = torch.nn.functional.cross_entropy(model(input_ids=t_ids, attention_mask=t_mask).logits, torch.tensor([0, 1, 2]))
        else:
            loss = model(input_ids=t_ids, attention_mask=t_mask, labels=t_ids.masked_fill(t_mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    _cli("from-peft", str(tmp_path / "peft"), "--bundle", str(b.path), "--fill-missing", "-o", str(tmp_path / "d.delta"))
    d = load_delta(tmp_path / "d.delta", b.manifest)
    assert any(np.abs(d.tensors[f"{s.module}.lora_B"]).max() > 0 for s in lora_slots)  # trained: B moved off zero
    ids, mask = _batch(b, 2)
    theirs = torch_reference.logits(model, ids, mask)
    ours = Predictor(b).logits(ids, mask, [d])
    keep = mask.astype(bool) if kind == "llama" else slice(None)  # padded LM positions are not compared
    assert np.abs(ours[keep] - theirs[keep]).max() < 1e-4


def test_peft_bias_all_adapter_converts_and_untranslatable_biases_are_refused(bundles, model_dirs, tmp_path):
    """A PEFT adapter saved with bias='all' (as PEFT writes it: every bias whole, original_module copies)."""
    import torch_reference

    from edgepeft.runtime.infer import Predictor
    from edgepeft.runtime.weights import read_frozen

    b = bundles("bert")
    slots = {s.name for s in b.manifest.slots}
    lora = sorted({s.module for s in b.manifest.slots if s.kind == "lora_A"})
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=lora, lora_dropout=0.0, bias="all", task_type="SEQ_CLS")
    model = peft.get_peft_model(torch_reference.load_hf(model_dirs("bert"), b), cfg).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".modules_to_save.default", "")
            if "lora_B" in name or plain in slots:  # what BitFit + LoRA + head would have trained
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "ok")
    base = read_frozen(b)
    d = from_peft(tmp_path / "ok", b.manifest, base_weights=base)
    ids, mask = _batch(b, 4)
    assert np.abs(Predictor(b).logits(ids, mask, [d]) - torch_reference.logits(model, ids, mask)).max() < 1e-4
    ln = "bert.encoder.layer.0.output.LayerNorm.bias"
    with torch.no_grad():
        model.get_submodule(f"base_model.model.{ln.removesuffix('.bias')}").bias.add_(0.5)
    model.save_pretrained(tmp_path / "ln")
    with pytest.raises(DeltaError, match=f"no slot in the bundle: base_model.model.{ln}"):
        from_peft(tmp_path / "ln", b.manifest, base_weights=base)


def _vera_adapter(bundles, tmp_path):
    from edgepeft.runtime.weights import read_frozen

    bundle = bundles("bert", method="vera")
    base = read_frozen(bundle)
    to_peft(delta_from_init(bundle.manifest, 3), bundle.manifest, tmp_path / "vera", base_weights=base)
    return bundle.manifest, base, tmp_path / "vera"


def test_from_peft_refuses_a_vera_adapter_of_another_projection_seed(bundles, tmp_path):
    manifest, base, d = _vera_adapter(bundles, tmp_path)
    cfg = json.loads((d / CONFIG_FILE).read_text())
    (d / CONFIG_FILE).write_text(json.dumps({**cfg, "projection_prng_key": cfg["projection_prng_key"] + 1}))
    with pytest.raises(DeltaError, match="projection_prng_key is 1, the bundle's is 0") as e:
        from_peft(d, manifest, base_weights=base)
    assert "\n" not in str(e.value)


def test_from_peft_refuses_vera_projections_that_are_not_the_bundles(bundles, tmp_path):
    manifest, base, d = _vera_adapter(bundles, tmp_path)
    t = safetensors.numpy.load_file(d / WEIGHTS_FILE)
    t["base_model.vera_A"] = t["base_model.vera_A"] * np.float32(1.5)
    (d / WEIGHTS_FILE).write_bytes(safetensors.numpy.save(t))
    with pytest.raises(DeltaError, match="'base_model.vera_A' is not the bundle's vera_A"):
        from_peft(d, manifest, base_weights=base)
