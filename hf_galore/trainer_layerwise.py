"""Layer-wise optimizers in ``transformers.Trainer``: the ``*_layerwise`` optim names and grad-norm logging.

The integration half of layer-wise mode (the optimizer itself is
``hf_galore.optim.layerwise``, which knows nothing of transformers): builders
for ``optim="galore_*_layerwise"``, the checks of Trainer settings that
layer-wise mode cannot honour, and the ``grad_norm`` a training log must
carry. ``GaLoreCallback`` applies the last two through public callback events
(``on_train_begin``, ``on_log``); no ``Trainer`` method is replaced, so no
transformers release can switch them off by renaming one.
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


def check_subspace_accumulation_args(optimizer: GaLoreOptimizer, args: Any, scaler: Any = None) -> None:
    """Refuse Trainer settings that the regular optimizer's ``accumulate="lowrank"`` cannot honour.

    Its hooks project and free every gradient of a projected weight, so the
    Trainer's global-norm clipping (``max_grad_norm``, which reads ``.grad``)
    and fp16 loss scaling would act on the full-rank weights only.
    """
    if not any(group.get("accumulate") == "lowrank" for group in optimizer.param_groups if "rank" in group):
        return
    max_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
    if max_norm > 0:
        raise UnsupportedSetupError(
            f"`max_grad_norm`={max_norm!r} with `accumulate='lowrank'`: the Trainer clips by the norm of `.grad`, "
            "but this optimizer's hooks project every gradient of a projected weight into its subspace and free "
            "it, so the Trainer would clip the full-rank weights alone. Set `max_grad_norm=0`, use a "
            "`*_layerwise` optim name (per-weight clipping, gradients accumulated in the subspace by default), or "
            "`accumulate='full'`; in a plain loop call `optimizer.clip_grad_norm_(c)`, which includes the subspace"
        )
    if scaler is not None:
        raise UnsupportedSetupError(
            "fp16 loss scaling with `accumulate='lowrank'`: the scaler unscales and checks `.grad` only, and the "
            "projected gradients are not there. Use `bf16=True` (or fp32), or `accumulate='full'`"
        )


def loss_scaler(optimizer: Any) -> Any:
    """The fp16 loss scaler accelerate attached to the Trainer's optimizer wrapper (``None``: no scaling).

    ``AcceleratedOptimizer.scaler`` is the accelerator's ``GradScaler``; the
    callback sees only the optimizer, so it looks along the ``.optimizer``
    chain for the first ``scaler``.
    """
    for _ in range(8):
        if optimizer is None:
            return None
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            return scaler
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def logged_grad_norm(optimizer: Any) -> float | None:
    """The ``grad_norm`` a training log must carry for a layer-wise optimizer (``None``: not layer-wise, or no step yet).

    The global pre-clip norm of the last committed step, which the hooks
    accumulated (:attr:`LayerwiseOptimizer.last_grad_norm`). The Trainer's own
    norm is computed after backward, when a layer-wise optimizer has already
    freed every gradient, so it reads 0 (or, on transformers 4.x with
    ``max_grad_norm=0``, is not logged at all); ``GaLoreCallback.on_log``
    writes this value instead, before any reporting callback sees the log.
    """
    layerwise = as_layerwise(optimizer)
    if layerwise is None or layerwise.last_grad_norm is None:
        return None
    return float(layerwise.last_grad_norm)


def _layerwise_builder(optimizer_class: type[GaLoreOptimizer], regular_name: str):
    """A Trainer builder for ``<regular_name>_layerwise``: the regular builder's kwargs, run layer-wise."""

    def build(groups, hp, config):
        _, kwargs = TRAINER_OPTIMIZERS[regular_name].build(groups, hp, config)
        clip = float(getattr(hp, "max_grad_norm", 0.0) or 0.0)
        if clip > 0:
            _warn_per_param_clip(clip)
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
            regular = TRAINER_OPTIMIZERS.get(regular_name)
            register_trainer_optimizer(
                name,
                _layerwise_builder(cls, regular_name),
                layerwise=True,
                requires=regular.requires if regular is not None else (),
            )


__all__ = [
    "check_subspace_accumulation_args",
    "check_trainer_args",
    "logged_grad_norm",
    "loss_scaler",
    "register_layerwise_trainer_optimizers",
]
