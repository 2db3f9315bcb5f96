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
