"""The import layers of setup.cfg's ``[importlinter]`` contracts hold (import-linter, not a home-made check).

Function-level imports count too: import-linter reads every ``import``
statement, so a deferred import cannot hide a cycle.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli")

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(capsys):
    cwd = os.getcwd()
    os.chdir(ROOT)  # import-linter reads setup.cfg from the working directory
    try:
        code = importlinter_cli.lint_imports(config_filename=str(ROOT / "setup.cfg"), no_cache=True)
    finally:
        os.chdir(cwd)
    report = capsys.readouterr().out
    assert code == 0, report
    assert "Contracts: 3 kept, 0 broken." in report
