"""hf_galore: GaLore-family memory-efficient optimizers for the Hugging Face stack.

``import hf_galore`` is enough to use the optimizers in a plain PyTorch loop.
"""

from __future__ import annotations

from .errors import GaLoreConfigError, HfGaloreError, UnsupportedSetupError
from .optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreOptimizer, RefreshStats

__version__ = "0.1.0"

__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreConfigError",
    "GaLoreOptimizer",
    "HfGaloreError",
    "RefreshStats",
    "UnsupportedSetupError",
    "__version__",
]
