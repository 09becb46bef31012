"""Run the compat tests as if galore-torch were not installed.

transformers' own GaLore path imports ``galore_torch``; hf_galore must not.
An autouse fixture hides every already-imported ``galore_torch`` module and
puts a finder first on ``sys.meta_path`` that refuses the name, so any
``import galore_torch`` during a test raises ``ModuleNotFoundError`` (as on a
machine without it) and a test that passes has run hf_galore alone. The
previous state is restored afterwards, so other test files that compare
against galore-torch keep it.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Iterator

import pytest

BLOCKED = "galore_torch"


class _BlockGaLoreTorch(importlib.abc.MetaPathFinder):
    """Refuses ``galore_torch`` and its submodules, whatever is installed."""

    def find_spec(self, fullname, path, target=None):
        """Raise for the blocked names; ``None`` (ask the next finder) for every other."""
        if fullname == BLOCKED or fullname.startswith(BLOCKED + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by tests/compat)", name=fullname)


@pytest.fixture(autouse=True)
def galore_torch_absent() -> Iterator[None]:
    hidden = {n: m for n, m in sys.modules.items() if n == BLOCKED or n.startswith(BLOCKED + ".")}
    for name in hidden:
        del sys.modules[name]
    finder = _BlockGaLoreTorch()
    sys.meta_path.insert(0, finder)
    try:
        with pytest.raises(ModuleNotFoundError):
            __import__(BLOCKED)
        yield
        assert not any(n == BLOCKED or n.startswith(BLOCKED + ".") for n in sys.modules), (
            "something imported galore_torch during a compat test"
        )
    finally:
        sys.meta_path.remove(finder)
        sys.modules.update(hidden)
