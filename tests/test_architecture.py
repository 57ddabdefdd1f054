"""The package's import layers (issue 11), checked by import-linter with the contracts in
pyproject.toml ([tool.importlinter]): entry points > run assembly > one step's phases > the
paper's nouns (independent of each other) > plumbing, and no import circle in any package.
Also: every module is placed in a layer, and no function imports a module of the package (an
import inside a function is only for an optional heavy dependency, with a comment saying so)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli (a dependency of import-linter)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "occ_exp"


def _lint_imports(pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter", reason="pip install -e '.[dev]' (import-linter)")
    proc = _lint_imports(SRC)
    assert proc.returncode == 0, f"lint-imports found a broken import contract:\n{proc.stdout}\n{proc.stderr}"
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    """The check can fail: plumbing (config) importing run assembly (trainer) is reported."""
    pytest.importorskip("importlinter", reason="pip install -e '.[dev]' (import-linter)")
    shutil.copytree(PACKAGE, tmp_path / "occ_exp", ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "occ_exp" / "config.py"
    config.write_text(config.read_text() + "\nimport occ_exp.trainer  # noqa: E402\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout and "occ_exp.config -> occ_exp.trainer" in proc.stdout


def test_every_module_has_a_layer():
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    top = {f"occ_exp.{p.stem if p.is_file() else p.name}" for p in PACKAGE.iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert not top - named, f"modules in no layer of pyproject.toml's [tool.importlinter]: {sorted(top - named)}"
    assert not named - top, f"layers name modules that do not exist: {sorted(named - top)}"


def _function_level_imports(path: Path):
    """(line, imported module, has a comment) of every import inside a function of `path`."""
    source = path.read_text()
    lines = source.splitlines()
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            for name in names:
                yield node.lineno, name, commented


def test_no_function_imports_a_module_of_the_package():
    inner = [f"{p.relative_to(ROOT)}:{line} imports {name}"
             for p in sorted(PACKAGE.rglob("*.py")) for line, name, _ in _function_level_imports(p)
             if name == "occ_exp" or name.startswith(("occ_exp.", "."))]
    assert not inner, "imports of occ_exp inside functions (move them to the module top):\n" + "\n".join(inner)


def test_function_level_imports_say_why():
    """An import inside a function is for an optional heavy dependency, with a comment saying so."""
    silent = [f"{p.relative_to(ROOT)}:{line} imports {name}"
              for p in sorted(PACKAGE.rglob("*.py")) for line, name, commented in _function_level_imports(p)
              if not commented]
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(silent)


def test_every_source_compiles_without_warnings():
    """Python 3.12 (the GPU machine's) printed SyntaxWarnings for invalid escapes in docstrings
    (reward/extract.py: '\\s', '\\c', '\\d'); a later Python makes them errors."""
    import warnings
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in [*sorted((root / "src").rglob("*.py")), *sorted((root / "scripts").glob("*.py"))]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(), str(path), "exec")
