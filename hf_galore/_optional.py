"""Optional dependencies, imported on use with the pip line in the error."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UnsupportedSetupError

_PIP_HINTS = {
    "bitsandbytes": "pip install 'hf_galore[8bit]'  (or: pip install bitsandbytes)",
    "transformers": "pip install transformers",
    "peft": "pip install 'hf_galore[examples]'  (or: pip install peft)",
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise an error that says which feature needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = _PIP_HINTS.get(module.split(".")[0], f"pip install {module.split('.')[0]}")
        raise UnsupportedSetupError(f"{feature} needs `{module}`, which is not installed: {hint}") from exc
