"""`edgepeft export FILE.gguf`: a GGUF file that transformers cannot read is one line naming the file."""

from __future__ import annotations

from cli_helpers import error_lines, run_cli


def test_an_unreadable_gguf_file_is_a_one_line_error_naming_it(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 60)
    r = run_cli(capsys, "export", bad, "-o", tmp_path / "out.bundle")
    assert r.code == 1
    lines = [l for l in error_lines(r) if not l.startswith("reading ")]
    assert len(lines) == 1 and str(bad) in lines[0] and "cannot read this GGUF file" in lines[0]
    assert not (tmp_path / "out.bundle").exists()


def test_a_missing_gguf_file_is_named(tmp_path, capsys):
    r = run_cli(capsys, "export", tmp_path / "none.gguf", "-o", tmp_path / "out.bundle")
    assert r.code == 1 and "no such GGUF file" in r.err


def test_a_gguf_export_records_the_gguf_file_as_its_source_not_the_temporary_folder(tmp_path, capsys, monkeypatch):
    import edgepeft.exporters.export as export_mod
    import edgepeft.exporters.gguf as gguf_mod

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    seen = {}

    def fake_convert(path, out_dir):  # conversion is transformers' job; the CLI's part is what it records
        seen["converted_into"] = out_dir
        return out_dir

    def fake_export(model_dir, out_dir, **kw):
        seen.update(model_dir=model_dir, source=kw["source"])
        raise SystemExit(0)

    monkeypatch.setattr(gguf_mod, "gguf_to_model_dir", fake_convert)
    monkeypatch.setattr(export_mod, "export_bundle", fake_export)
    run_cli(capsys, "export", gguf, "-o", tmp_path / "out.bundle")
    assert seen["model_dir"] == seen["converted_into"] and seen["source"] == gguf
