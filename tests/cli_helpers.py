"""Run the real CLI entry point in-process and capture what a user sees."""

from __future__ import annotations

from dataclasses import dataclass

from edgepeft.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(capsys, *argv: str) -> Result:
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def error_lines(r: Result) -> list[str]:
    """The stderr lines that are not progress output."""
    return [l for l in r.err.splitlines() if l.strip() and not l.startswith("[")]
