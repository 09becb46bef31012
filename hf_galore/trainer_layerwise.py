"""Layer-wise optimizers in ``transformers.Trainer``: the ``*_layerwise`` optim names and grad-norm logging.

The integration half of layer-wise mode (the optimizer itself is
``hf_galore.optim.layerwise``, which knows nothing of transformers): builders
for ``optim="galore_*_layerwise"``, the checks of Trainer settings that
layer-wise mode cannot honour, and the Trainer support that logs the real
gradient norm (installed when ``transformers.trainer`` is imported, see
``hf_galore.trainer``).
"""

from __future__ import annotations

import warnings
from typing import Any

from .errors import UnsupportedSetupError
from .optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .optim.base import GaLoreOptimizer
from .optim.layerwise import LayerwiseOptimizer, as_layerwise
from .trainer_args import TRAINER_OPTIMIZERS, register_trainer_optimizer


def check_trainer_args(optimizer: LayerwiseOptimizer, args: Any, scaler: Any = None) -> None:
    """Refuse Trainer settings that layer-wise mode cannot honour, saying what to set instead.

    ``args`` is a ``transformers.TrainingArguments``. ``max_grad_norm`` must
    match the optimizer's per-parameter clip (the ``*_layerwise`` optim names
    build it that way): global-norm clipping would need every gradient at
    once, and the Trainer's own clipping sees none (they are already freed).
    """
    max_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
    if max_norm > 0 and optimizer.per_param_max_norm != max_norm:
        raise UnsupportedSetupError(
            f"`max_grad_norm`={max_norm!r} asks the Trainer to clip the global gradient norm, which "
            "layer-wise mode cannot do: each gradient is freed inside its hook. Either set "
            "`max_grad_norm=0` (no clipping), or clip each weight's gradient separately with "
            f"`LayerwiseOptimizer(..., per_param_max_norm={max_norm!r})` (the *_layerwise optim names "
            f"do this); this optimizer has `per_param_max_norm`={optimizer.per_param_max_norm!r}"
        )
    if scaler is not None:
        raise UnsupportedSetupError(
            "layer-wise mode cannot be combined with fp16 loss scaling: the hooks would update the "
            "weights with scaled gradients before the scaler unscales or checks them. Use `bf16=True` "
            "(or fp32), or the regular optimizer (optim='galore_adamw')"
        )
    accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    if accumulation > 1 and optimizer.sync is None and optimizer.accumulation_steps == 1:
        raise UnsupportedSetupError(
            f"`gradient_accumulation_steps`={accumulation!r} but this layer-wise optimizer treats every "
            "gradient as final (`sync=None`); build it with the default `sync='auto'` so it follows "
            "the Trainer's accumulation windows"
        )


def install_trainer_support() -> bool:
    """Teach ``transformers.Trainer`` to clip and log the gradient norm of a layer-wise optimizer.

    The Trainer computes ``grad_norm`` with ``accelerator.clip_grad_norm_``
    after backward, when a layer-wise optimizer has already freed every
    gradient, so it would log 0 and clip nothing. We wrap the Trainer's two
    private helpers (``_clip_grad_norm``, ``_get_grad_norm``): for a
    :class:`LayerwiseOptimizer` they check the arguments
    (:func:`check_trainer_args`) and return the norm the hooks recorded
    (clipping already happened per parameter); every other optimizer goes
    through the original code. Idempotent; returns ``False`` when the
    installed transformers has no such helpers (layer-wise training then
    still works, but the logged ``grad_norm`` is not the real one).
    """
    try:
        from transformers import Trainer
    except ImportError:
        return False
    if getattr(Trainer, "_hf_galore_layerwise", False):
        return True
    if not (callable(getattr(Trainer, "_clip_grad_norm", None)) and callable(getattr(Trainer, "_get_grad_norm", None))):
        return False
    original_clip = Trainer._clip_grad_norm
    original_get = Trainer._get_grad_norm

    def _layerwise_of(trainer) -> LayerwiseOptimizer | None:
        optimizer = as_layerwise(trainer.optimizer)
        if optimizer is not None:
            check_trainer_args(optimizer, trainer.args, getattr(trainer.accelerator, "scaler", None))
        return optimizer

    def _clip_grad_norm(self, model):
        optimizer = _layerwise_of(self)
        if optimizer is None:
            return original_clip(self, model)
        return optimizer.current_grad_norm()

    def _get_grad_norm(self, model, grad_norm=None):
        optimizer = _layerwise_of(self)
        if optimizer is None:
            return original_get(self, model, grad_norm=grad_norm)
        return optimizer.current_grad_norm() if grad_norm is None else grad_norm

    _clip_grad_norm.__doc__ = original_clip.__doc__
    _get_grad_norm.__doc__ = original_get.__doc__
    Trainer._clip_grad_norm = _clip_grad_norm
    Trainer._get_grad_norm = _get_grad_norm
    Trainer._hf_galore_layerwise = True
    return True


def _layerwise_builder(optimizer_class: type[GaLoreOptimizer], regular_name: str):
    """A Trainer builder for ``<regular_name>_layerwise``: the regular builder's kwargs, run layer-wise."""

    def build(groups, hp, config):
        _, kwargs = TRAINER_OPTIMIZERS[regular_name].build(groups, hp, config)
        clip = float(getattr(hp, "max_grad_norm", 0.0) or 0.0)
        if clip > 0:
            _warn_per_param_clip(clip)
        install_trainer_support()
        return LayerwiseOptimizer, {
            "optimizer_class": optimizer_class,
            "per_param_max_norm": clip if clip > 0 else None,
            **kwargs,
        }

    build.__doc__ = f"``optim='{regular_name}_layerwise'``: {optimizer_class.__name__} updated in gradient hooks."
    return build


_WARNED_CLIP: set[float] = set()


def _warn_per_param_clip(clip: float) -> None:
    if clip not in _WARNED_CLIP:
        _WARNED_CLIP.add(clip)
        warnings.warn(
            f"layer-wise mode: `max_grad_norm`={clip!r} clips each weight's gradient to norm {clip!r} "
            "separately (the global norm needs every gradient at once, which layer-wise mode never holds); "
            "the logged grad_norm is still the global pre-clip norm. Set `max_grad_norm=0` to disable clipping.",
            UserWarning,
            stacklevel=3,
        )


def register_layerwise_trainer_optimizers() -> None:
    """Register ``galore_adamw_layerwise``, ``galore_adamw_8bit_layerwise``, ``galore_adafactor_layerwise``."""
    for regular_name, cls in (
        ("galore_adamw", GaLoreAdamW),
        ("galore_adamw_8bit", GaLoreAdamW8bit),
        ("galore_adafactor", GaLoreAdafactor),
    ):
        name = f"{regular_name}_layerwise"
        if name not in TRAINER_OPTIMIZERS:
            register_trainer_optimizer(name, _layerwise_builder(cls, regular_name), layerwise=True)


__all__ = [
    "check_trainer_args",
    "install_trainer_support",
    "register_layerwise_trainer_optimizers",
]
