"""The notebook needs nothing beyond ``pip install -e '.[examples]'``: every package it imports is declared.

The imports are those of the notebook's code cells and, recursively, of the
example modules next to it that they import (``compare`` → ``run_glue`` →
...), function-level imports included. The requirements are read from
setup.cfg, where this package declares them (``install_requires`` and the
``examples`` extra; pyproject.toml holds only the build system and ruff).
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "examples").rglob("*.ipynb"))


def imported_names(source: str) -> set[str]:
    """Top-level package names of every absolute import in ``source``, wherever the statement is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def notebook_imports(notebook: Path) -> set[str]:
    """Third-party packages the notebook imports, directly or through the example modules beside it."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    todo = set().union(*(imported_names("".join(c["source"])) for c in cells if c["cell_type"] == "code"))
    seen: set[str] = set()
    third_party: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        local = notebook.parent / f"{name}.py"
        if local.is_file():
            todo |= imported_names(local.read_text(encoding="utf-8"))
        elif name not in sys.stdlib_module_names and name != "hf_galore":
            third_party.add(name)
    return third_party


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions(extra: str = "examples") -> set[str]:
    """Distribution names in ``install_requires`` and the ``extra`` extra of setup.cfg, canonicalized."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines() + config["options.extras_require"][extra].splitlines()
    requirements = [line.split("#")[0].strip() for line in lines]
    return {_canonical(re.match(r"[A-Za-z0-9_.-]+", r)[0]) for r in requirements if r}


def test_import_names_are_read_from_cells_and_local_modules(tmp_path):
    (tmp_path / "helper.py").write_text("def f():\n    import scipy.stats\n")
    cell = {"cell_type": "code", "source": ["import helper, os\n", "from IPython.display import Markdown\n"]}
    markdown = {"cell_type": "markdown", "source": ["import not_code"]}
    (tmp_path / "nb.ipynb").write_text(json.dumps({"cells": [cell, markdown]}))
    assert notebook_imports(tmp_path / "nb.ipynb") == {"scipy", "IPython"}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_notebook_imports_only_declared_packages(notebook):
    assert NOTEBOOKS, "no notebook found under examples/"
    declared = declared_distributions()
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for name in sorted(notebook_imports(notebook)):
        dists = {_canonical(d) for d in providers.get(name, [])}
        if not dists & declared:
            missing[name] = sorted(dists) or "not installed here"
    assert not missing, f"imported by {notebook.name} but not in install_requires or [examples]: {missing}"
