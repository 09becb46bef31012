"""hf_galore: GaLore-family memory-efficient optimizers for the Hugging Face stack.

``import hf_galore`` is enough to use the optimizers in a plain PyTorch loop,
and it makes ``TrainingArguments(optim="galore_adamw", ...)`` build them: the
Trainer hook is installed when ``transformers.trainer`` is imported (see
``hf_galore.trainer``), so this import stays fast.
"""

from __future__ import annotations

from .config import GaLoreConfig
from .distributed import check_supported_engine, register_layerwise_ddp_hook, synchronize_bases
from .errors import GaLoreConfigError, HfGaloreError, StateMismatchError, UnsupportedSetupError
from .int8_targets import load_checkpoint_into_int8, prepare_model_for_int8_weights
from .memory import MemoryEstimate, estimate_memory
from .optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreOptimizer, RefreshStats
from .optim.layerwise import LayerwiseOptimizer
from .quant import Int8Linear, dequantize_int8_weights
from .targets import TargetModulesError, galore_param_groups
from .trainer import create_optimizer, install_import_hook, register_trainer_optimizer, register_with_transformers
from .trainer_layerwise import register_layerwise_trainer_optimizers

__version__ = "0.1.0"

# `optim="galore_*_layerwise"` names, then the hook that registers every
# `galore_*` name once transformers' Trainer module is imported.
register_layerwise_trainer_optimizers()
install_import_hook()


def __getattr__(name: str):
    # GaLoreCallback subclasses transformers' TrainerCallback, whose import costs seconds: load on use.
    if name == "GaLoreCallback":
        from ._optional import require

        require("transformers", "GaLoreCallback")
        from .callback import GaLoreCallback

        return GaLoreCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreCallback",
    "GaLoreConfig",
    "GaLoreConfigError",
    "GaLoreOptimizer",
    "HfGaloreError",
    "Int8Linear",
    "LayerwiseOptimizer",
    "MemoryEstimate",
    "RefreshStats",
    "StateMismatchError",
    "TargetModulesError",
    "UnsupportedSetupError",
    "__version__",
    "check_supported_engine",
    "create_optimizer",
    "dequantize_int8_weights",
    "estimate_memory",
    "galore_param_groups",
    "load_checkpoint_into_int8",
    "prepare_model_for_int8_weights",
    "register_layerwise_ddp_hook",
    "register_trainer_optimizer",
    "register_with_transformers",
    "synchronize_bases",
]
