"""GaLore-family optimizers: one low-rank mechanism (``base``), thin base updates."""

from __future__ import annotations

from .adafactor import GaLoreAdafactor
from .adamw import GaLoreAdamW
from .adamw8bit import GaLoreAdamW8bit
from .base import GaLoreOptimizer
from .stats import RefreshStats

__all__ = ["GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreOptimizer", "RefreshStats"]
