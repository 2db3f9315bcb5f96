"""The method registry: one registration per method, refused twice; options checked before any tracing."""

from __future__ import annotations

import json

import pytest

from cli_helpers import error_lines, run_cli
from edgepeft import methods
from edgepeft.errors import ExportError
from edgepeft.manifest import Manifest, Slot


class _Twin(methods.Method):
    name = "lora"
    kinds = ("twin_kind",)

    def plan(self, view, config):
        return []


class _Thief(methods.Method):
    name = "thief"
    kinds = ("lora_A",)

    def plan(self, view, config):
        return []


def test_registering_a_taken_method_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        methods.register(_Twin())
    assert "twin_kind" not in methods.kinds()


def test_registering_a_slot_kind_another_method_owns_is_refused():
    with pytest.raises(ValueError, match="already owned by lora"):
        methods.register(_Thief())
    assert "thief" not in methods.names()


def test_every_registered_method_has_its_torch_half():
    from edgepeft.exporters.methods import torch_method

    for name in methods.names():
        assert torch_method(name).name == name


def test_a_method_string_is_parsed_in_registration_order_and_bad_ones_are_refused():
    assert [m.name for m in methods.parse("bitfit+lora")] == ["lora", "bitfit"]
    for bad, why in (("lora+", "empty name"), ("lora+lora", "twice"), ("lorax", "unknown method 'lorax'")):
        with pytest.raises(ExportError, match=why):
            methods.parse(bad)


def test_plain_option_keys_go_to_every_chosen_method_that_has_them():
    chosen = methods.parse("lora+bitfit")
    cfg = methods.configs(chosen, {"rank": "4", "bitfit.exclude": "key,query"})
    assert cfg["lora"].rank == 4 and cfg["bitfit"].exclude == ("key", "query")
    with pytest.raises(ExportError, match="--method-config dropout: no chosen method takes it"):
        methods.configs(chosen, {"dropout": "0.1"})
    with pytest.raises(ExportError, match=r"lora\.rank=four: expected int"):
        methods.configs(chosen, {"lora.rank": "four"})


def test_a_manifest_written_before_the_registry_still_reads(tmp_path):
    slot = Slot("enc.q.lora_A", "lora_A", "enc.q", (4, 8), rank=4, alpha=8.0, init="kaiming_uniform")
    m = Manifest(fingerprint="f" * 64, source="s", architecture="A", model_type="bert", task="sequence-classification",
                 method="lora+bitfit", quantization="none", max_length=8, vocab_size=10, pad_token_id=0, slots=(slot,), graphs={})
    d = json.loads(m.to_json())
    del d["method_config"]  # the key older exporters did not write
    back = Manifest.from_json(json.dumps(d))
    assert back.method == "lora+bitfit" and back.method_config == {} and back.slots == (slot,)


@pytest.mark.parametrize("args, words", [
    (["--method-config", "rank=0"], ["rank must be a positive integer"]),
    (["--method-config", "lora.rank=99"], ["lora.rank", "99", "above the width"]),
    (["--method-config", "lora.targets=nope"], ["lora.targets", "'nope' matches no linear module"]),
    (["--method-config", "lora.dropout=0.1"], ["lora.dropout", "no such option"]),
    (["--method", "lora+ia9"], ["unknown method 'ia9'"]),
    # methods3: VeRA, the r x r core, bottleneck adapters
    (["--method", "vera", "--method-config", "vera.targets=nope"], ["vera.targets", "'nope' matches no linear module"]),
    (["--method", "vera", "--method-config", "vera.rank=0"], ["vera.rank", "positive integer"]),
    (["--method", "loraxs", "--method-config", "loraxs.rank=33"], ["loraxs.rank", "33", "above the width"]),
    (["--method", "loraxs", "--method-config", "loraxs.targets=nope"], ["loraxs.targets", "'nope' matches no linear module"]),
    (["--method", "bottleneck", "--method-config", "bottleneck.reduction_factor=33"],
     ["bottleneck.reduction_factor", "33", "leaves no width"]),
    (["--method", "bottleneck", "--method-config", "bottleneck.targets=nope"], ["bottleneck.targets", "'nope' matches no linear module"]),
    (["--method", "bottleneck", "--method-config", "bottleneck.non_linearity=swish"], ["bottleneck.non_linearity", "'swish'"]),
    (["--method", "bottleneck", "--method-config", "bottleneck.placement=middle"], ["bottleneck.placement", "houlsby, pfeiffer"]),
])
def test_a_bad_method_option_is_refused_in_one_line_before_tracing_writing_nothing(args, words, model_dirs, tmp_path,
                                                                                     capsys, monkeypatch):
    from edgepeft.exporters import trace

    def no_trace(*a, **k):
        raise AssertionError("traced despite a bad option")

    monkeypatch.setattr(trace, "export_graphs", no_trace)
    out = tmp_path / "b"
    r = run_cli(capsys, "export", model_dirs("bert"), "-o", out, *args)
    lines = error_lines(r)
    assert r.code != 0 and len(lines) == 1, r.err
    for w in words:
        assert w in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_method_options_from_a_json_file_reach_the_manifest(model_dirs, tmp_path, capsys):
    from edgepeft.manifest import read_manifest

    options = tmp_path / "options.json"
    options.write_text(json.dumps({"lora.targets": ["query"], "alpha": 4}))
    r = run_cli(capsys, "export", model_dirs("bert"), "-o", tmp_path / "b", "--method", "lora", "--method-config", options,
                "--quantize", "none", "--top-layers", "all")
    assert r.code == 0, r.err
    m = read_manifest(tmp_path / "b")
    assert m.method_config["lora"] == {"rank": 8, "alpha": 4.0, "targets": ["query"]}
    assert {s.module.rsplit(".", 1)[-1] for s in m.slots if s.kind == "lora_A"} == {"query"}
    assert {s.scale for s in m.slots if s.rank} == {0.5}


def test_to_peft_of_a_bitfit_only_delta_is_refused_in_one_line(tmp_path):
    # PEFT refuses a directory that adapts no module ("No modules were targeted for adaptation"): say so here.
    from edgepeft.delta import delta_from_init
    from edgepeft.delta.peft_format import to_peft
    from edgepeft.errors import DeltaError

    slot = Slot("enc.0.q.bias", "bias", "enc.0.q", (8,))
    m = Manifest(fingerprint="f" * 64, source="s", architecture="A", model_type="bert", task="sequence-classification",
                 method="bitfit", quantization="none", max_length=8, vocab_size=10, pad_token_id=0, slots=(slot,), graphs={})
    with pytest.raises(DeltaError, match="a bitfit delta has no PEFT adapter equivalent") as e:
        to_peft(delta_from_init(m, 0), m, tmp_path / "peft")
    assert "\n" not in str(e.value) and not (tmp_path / "peft").exists()
