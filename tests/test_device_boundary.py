"""The device side never needs the workstation's libraries: statically, and in a process where they cannot load."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("torch", "transformers", "optimum", "peft", "onnxscript")
# edgepeft's import namespace -> source folder (pyproject's package-dir)
PACKAGES = {"edgepeft.runtime": ROOT / "runtime", "edgepeft.devices": ROOT / "devices",
            "edgepeft.exporters": ROOT / "exporters", "edgepeft": ROOT / "edgepeft"}
# where the device side starts: its two folders and the commands a device runs
DEVICE_ENTRY = ["runtime", "devices", "edgepeft/cli.py", "edgepeft/commands/train.py", "edgepeft/commands/infer.py",
                "edgepeft/commands/sync.py", "edgepeft/commands/chat.py"]


def source_of(module: str) -> Path | None:
    """The file of an edgepeft module (None for anything else)."""
    for prefix, folder in PACKAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            rel = module[len(prefix):].lstrip(".").replace(".", "/")
            for p in (folder / rel / "__init__.py", folder / f"{rel}.py") if rel else (folder / "__init__.py",):
                if p.is_file():
                    return p
            return None
    return None


def module_of(path: Path) -> str:
    for prefix, folder in PACKAGES.items():
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            return ".".join([prefix, *[p for p in parts if p != "__init__"]])
    raise ValueError(path)


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module a file imports, anywhere in it (function bodies too), with the line."""
    out = []
    package = module_of(path) if path.name == "__init__.py" else module_of(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]  # `from pkg import module`
    return out


def test_nothing_the_device_side_imports_reaches_the_workstation_libraries():
    todo = [p for e in DEVICE_ENTRY for p in ((ROOT / e).rglob("*.py") if (ROOT / e).is_dir() else [ROOT / e])]
    assert any(p.name == "trainer.py" for p in todo) and len(todo) > 15
    seen, bad = set(), []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name, line in imports(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {name}"
            if name.split(".")[0] in FORBIDDEN:
                bad.append(where)
            elif name.startswith("edgepeft.exporters"):
                bad.append(where + " (workstation side)")
            else:  # importing a.b.c runs a, a.b and a.b.c
                parts = name.split(".")
                todo += [s for i in range(1, len(parts) + 1) if (s := source_of(".".join(parts[:i]))) is not None]
    assert ROOT / "edgepeft" / "delta" / "__init__.py" in seen  # the walk follows edgepeft's own modules
    assert not bad, "\n".join(bad)


BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed on this device")
        return None
sys.meta_path.insert(0, Block())
try:
    import torch
    sys.exit("the blocker does not work")
except ImportError:
    pass
from edgepeft.cli import main
try:
    main(sys.argv[1:])
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("LOADED", loaded, file=sys.stderr)
"""


def test_training_runs_where_torch_transformers_optimum_and_peft_cannot_be_imported(bundles, tmp_path):
    b = bundles("bert")
    from synthetic_tasks import classification_files

    train, val = classification_files(tmp_path, n_train=96, n_val=24)
    code = BLOCKER.format(blocked=set(FORBIDDEN))
    steps = [["train", b.path, "--data", train, "--val", val, "-o", tmp_path / "d.delta", "--max-steps", "4",
              "--batch-size", "8", "--checkpoint-dir", tmp_path / "ck", "--memory-budget", "4000"],
             ["eval", b.path, "--data", val, "--delta", tmp_path / "d.delta"],
             ["infer", b.path, "--delta", tmp_path / "d.delta", "w1 w2 w3"]]
    for argv in steps:
        r = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "LOADED []" in r.stderr, r.stderr[-3000:]
    assert "LABEL_" in r.stdout  # infer printed a prediction
