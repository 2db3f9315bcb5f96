"""The benchmarks run for minutes, outside the test suite; this keeps them in step with the code.

Their child processes are Python source in strings, which no import check sees: every
``from edgepeft... import names`` in a benchmark file, strings included, must name what exists.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
FROM_IMPORT = re.compile(r"^\s*from (edgepeft[\w.]*) import \(?([\w, \n]+?)\)?\s*(?:#.*)?$", re.M)


def _imports(path: Path) -> list[tuple[str, str]]:
    return [(mod, name.split(" as ")[0].strip()) for mod, names in FROM_IMPORT.findall(path.read_text())
            for name in names.replace("\n", " ").split(",") if name.strip()]


def test_the_benchmarks_are_found():
    assert len(BENCHMARKS) >= 10 and any(_imports(p) for p in BENCHMARKS)


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_name_what_edgepeft_has(path):
    for mod, name in _imports(path):
        module = importlib.import_module(mod)
        assert hasattr(module, name) or importlib.util.find_spec(f"{mod}.{name}") is not None, \
            f"{path.name}: {mod} has no {name}"


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_compiles(path):
    compile(path.read_text(), str(path), "exec")
