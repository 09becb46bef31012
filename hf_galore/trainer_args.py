"""What a ``TrainingArguments`` asks of hf_galore: optim names, their builders, the GaLore config, the engine.

The part of the Trainer integration that both the hook (``hf_galore.trainer``)
and the callback (``hf_galore.callback``) read, so that the two import in one
direction only (trainer → callback → this module). Nothing here imports
transformers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer

from ._optional import require
from .config import GaLoreConfig
from .errors import GaLoreConfigError, UnsupportedSetupError, format_choices

if TYPE_CHECKING:
    from transformers import TrainingArguments

EXPLICIT_PATH = "Trainer(..., optimizers=(hf_galore.create_optimizer(model, args), None))"

#: transformers' ``OptimizerNames`` values of the GaLore family: always claimed once the hook is in,
#: so transformers' galore-torch path is never used by accident.
TRANSFORMERS_GALORE_NAMES = (
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
)


@dataclass
class _HookState:
    """Where the Trainer hook stands (kept here so the callback can read it without importing the hook)."""

    installed: bool = False
    error: str | None = None
    handlers_table: dict | None = None
    #: called after a registration once the hook is in (``hf_galore.trainer`` sets it)
    on_register: Callable[[], None] | None = None


HOOK_STATE = _HookState()


@dataclass(frozen=True)
class HyperParams:
    """Training hyper-parameters that are not GaLore settings (``TrainingArguments`` names in comments)."""

    lr: float = 1e-3  # learning_rate
    weight_decay: float = 0.0  # weight_decay (decay groups only, Trainer rule)
    betas: tuple[float, float] = (0.9, 0.999)  # adam_beta1, adam_beta2
    eps: float = 1e-8  # adam_epsilon
    max_grad_norm: float = 0.0  # max_grad_norm (read by the *_layerwise builders: per-parameter clipping)

    @classmethod
    def from_training_args(cls, args: TrainingArguments) -> HyperParams:
        return cls(
            lr=float(args.learning_rate),
            weight_decay=float(args.weight_decay),
            betas=(float(args.adam_beta1), float(args.adam_beta2)),
            eps=float(args.adam_epsilon),
            max_grad_norm=float(getattr(args, "max_grad_norm", 0.0) or 0.0),
        )


#: ``(param_groups, hyper_params, config) -> (optimizer class, constructor kwargs without params)``.
OptimizerBuilder = Callable[[list[dict], HyperParams, GaLoreConfig], tuple[type[Optimizer], dict[str, Any]]]


@dataclass(frozen=True)
class TrainerOptimizer:
    """One ``optim=`` name: its builder, whether it runs layer-wise, and the optional modules it needs."""

    name: str
    build: OptimizerBuilder
    layerwise: bool = False
    #: modules imported when the name is chosen (``Trainer(...)``), so a missing one fails before any data is read
    requires: tuple[str, ...] = ()


TRAINER_OPTIMIZERS: dict[str, TrainerOptimizer] = {}


def register_trainer_optimizer(
    name: str, build: OptimizerBuilder, *, layerwise: bool = False, requires: tuple[str, ...] = ()
) -> TrainerOptimizer:
    """Make ``optim=name`` build an hf_galore optimizer; names are unique.

    ``requires`` names optional modules the optimizer imports (``"bitsandbytes.functional"``):
    ``Trainer(...)`` checks them, with the pip line, instead of ``train()`` failing later.
    """
    if name in TRAINER_OPTIMIZERS:
        raise GaLoreConfigError(f"Trainer optimizer {name!r} is already registered")
    entry = TrainerOptimizer(name, build, layerwise, tuple(requires))
    TRAINER_OPTIMIZERS[name] = entry
    if HOOK_STATE.installed and HOOK_STATE.on_register is not None:
        HOOK_STATE.on_register()  # hf_galore.trainer: put the new name into transformers' tables too
    return entry


def lookup_trainer_optimizer(name: str, config: GaLoreConfig) -> TrainerOptimizer:
    """The registered entry ``optim=name`` builds (``<name>_layerwise`` when ``config.layerwise``)."""
    if config.layerwise and not name.endswith("_layerwise"):
        name += "_layerwise"
    entry = TRAINER_OPTIMIZERS.get(name)
    if entry is None:
        raise UnsupportedSetupError(
            f"`optim`={name!r} is not provided by hf_galore; available: {format_choices(TRAINER_OPTIMIZERS)}"
        )
    return entry


def check_optional_dependencies(name: str, config: GaLoreConfig) -> None:
    """Import the optional modules ``optim=name`` needs; a missing one is an error with its pip line."""
    entry = lookup_trainer_optimizer(name, config)
    for module in entry.requires:
        require(module, f"`optim`={entry.name!r}")


# ----------------------------------------------------------------- building
def optim_name(args: Any) -> str:
    """``args.optim`` as a plain string (it is an ``OptimizerNames`` member after validation)."""
    optim = getattr(args, "optim", None)
    return str(getattr(optim, "value", optim))


def is_galore_optim(name: str) -> bool:
    return name in TRAINER_OPTIMIZERS or name in TRANSFORMERS_GALORE_NAMES


def check_supported_engine(args: Any) -> None:
    """Refuse DeepSpeed and FSDP1: both replace the parameters the optimizer sees.

    ZeRO partitions gradients and optimizer states and runs its own step,
    and FSDP1 hands the optimizer flattened 1-D parameters, so there is no
    weight matrix left to project.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":  # set by `accelerate launch`
        raise UnsupportedSetupError(
            "GaLore optimizers cannot run under DeepSpeed (ACCELERATE_USE_DEEPSPEED=true): ZeRO partitions "
            "gradients and optimizer states and steps its own optimizer, so there is no weight matrix to "
            "project. Use DDP or FSDP2 (`fsdp_version: 2`); see docs/distributed.md"
        )
    try:
        from .distributed import check_supported_engine as check_engine
    except ImportError:  # pragma: no cover - a build without the distributed module
        check_engine = _check_engine_fallback
    check_engine(args)


def _check_engine_fallback(args: Any) -> None:
    instead = "GaLore runs on one device, under DDP and under FSDP2 (`fsdp_config={'version': 2}`)"
    if getattr(args, "deepspeed", None):
        raise UnsupportedSetupError(f"GaLore optimizers cannot run under DeepSpeed; remove `deepspeed`. {instead}")
    if getattr(args, "fsdp", None):
        fsdp_config = getattr(args, "fsdp_config", None) or {}
        if int(fsdp_config.get("version", _default_fsdp_version())) == 1:
            raise UnsupportedSetupError(f"GaLore optimizers cannot run under FSDP1. {instead}")


def _default_fsdp_version() -> int:
    import transformers

    return 2 if int(transformers.__version__.split(".")[0]) >= 5 else 1


def config_from_training_args(args: Any) -> GaLoreConfig:
    """``GaLoreConfig`` from ``optim_args``, ``optim_target_modules`` and the optim name."""
    name = optim_name(args)
    overrides: dict[str, Any] = {}
    targets = getattr(args, "optim_target_modules", None)
    if targets is not None:
        overrides["target_modules"] = targets
    if name.endswith("_layerwise"):
        overrides["layerwise"] = True
    return GaLoreConfig.from_optim_args(getattr(args, "optim_args", None), **overrides)


def hook_error() -> str | None:
    """Why the Trainer hook is not installed (``None`` when it is, or not attempted yet)."""
    return HOOK_STATE.error


__all__ = [
    "EXPLICIT_PATH",
    "HOOK_STATE",
    "TRAINER_OPTIMIZERS",
    "TRANSFORMERS_GALORE_NAMES",
    "HyperParams",
    "OptimizerBuilder",
    "TrainerOptimizer",
    "check_optional_dependencies",
    "check_supported_engine",
    "config_from_training_args",
    "hook_error",
    "is_galore_optim",
    "lookup_trainer_optimizer",
    "optim_name",
    "register_trainer_optimizer",
]
