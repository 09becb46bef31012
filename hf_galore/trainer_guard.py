"""What a Trainer run leaves behind however ``train()`` ends: no live gradient hooks, a named damaged file.

A layer-wise optimizer updates weights from gradient hooks on the model. A
run that ends normally removes them in ``GaLoreCallback.on_train_end``; one
stopped by an exception (Ctrl-C in a notebook, a callback error, an OOM)
never reaches that event, and the hooks would keep consuming the gradients
of whatever loop trains the model next. ``guard_train`` wraps one Trainer
*instance*'s ``train`` (no ``Trainer`` class attribute is touched, so no
transformers release can bypass or break it by renaming a method) so that on
any exception the hooks are removed (and re-armed by the next ``train()``),
and a resume that failed on a truncated or damaged checkpoint file raises
:class:`~hf_galore.checkpoint_files.CheckpointFileError` naming the file.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from .checkpoint_files import damaged_checkpoint_error
from .optim.layerwise import LayerwiseOptimizer

#: set on a LayerwiseOptimizer whose hooks were removed at the end of a ``train()``: the next one re-arms them
REARM_ATTR = "_hf_galore_rearm_hooks"
#: set on a Trainer instance whose ``train`` is wrapped (once per instance)
_GUARDED_ATTR = "_hf_galore_train_guarded"
#: frames searched above a callback event for the Trainer that fired it (Trainer.__init__ → handler → event)
_MAX_FRAMES = 12


def is_hf_galore_optimizer(optimizer: Any) -> bool:
    """An optimizer of this package (a GaLore member or the layer-wise wrapper), by its counters and origin."""
    return hasattr(optimizer, "galore_stats") and type(optimizer).__module__.startswith("hf_galore.")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar ``.optimizer`` wrappers)."""
    for _ in range(8):
        if is_hf_galore_optimizer(optimizer) or not hasattr(optimizer, "optimizer"):
            break
        optimizer = optimizer.optimizer
    return optimizer


def end_layerwise_hooks(optimizer: Any) -> bool:
    """Remove a layer-wise optimizer's gradient hooks and mark them for the next ``train()``; True if removed."""
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, LayerwiseOptimizer) and inner.hooks_registered:
        inner.remove_hooks()
        setattr(inner, REARM_ATTR, True)
        return True
    return False


def rearm_layerwise_hooks(optimizer: Any) -> None:
    """Attach again the hooks :func:`end_layerwise_hooks` removed (the same Trainer trains again)."""
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, LayerwiseOptimizer) and getattr(inner, REARM_ATTR, False):
        inner.register_hooks()
        setattr(inner, REARM_ATTR, False)


def calling_trainer(callback: Any) -> Any | None:
    """The Trainer whose callback event is running ``callback`` (searched up the calling frames), or ``None``.

    Events are called synchronously by ``Trainer`` → ``CallbackHandler``, so
    the Trainer is a few frames up: the first ``self`` there whose
    ``callback_handler`` holds ``callback``.
    """
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)
        if handler is not None and any(cb is callback for cb in getattr(handler, "callbacks", ())):
            return owner
        frame = frame.f_back
    return None


def _resume_folder(trainer: Any, args: tuple, kwargs: dict) -> str | None:
    """The checkpoint folder ``train(resume_from_checkpoint=...)`` resumes from, if any."""
    resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
    if resume is None or resume is False:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        output_dir = getattr(trainer.args, "output_dir", None)
        return get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
    return os.fspath(resume) if isinstance(resume, (str, os.PathLike)) else None


def guard_train(trainer: Any) -> None:
    """Wrap ``trainer.train`` (this instance only, once): hooks end and damaged files are named on any exception."""
    if getattr(trainer, _GUARDED_ATTR, False):
        return
    train = trainer.train  # the bound method, a subclass's override included

    @functools.wraps(train)
    def guarded_train(*args: Any, **kwargs: Any) -> Any:
        try:
            return train(*args, **kwargs)
        except BaseException as exc:
            end_layerwise_hooks(getattr(trainer, "optimizer", None))
            if isinstance(exc, Exception):
                folder = _resume_folder(trainer, args, kwargs)
                damaged = damaged_checkpoint_error(folder) if folder else None
                if damaged is not None:
                    raise damaged from exc
            raise

    trainer.train = guarded_train
    setattr(trainer, _GUARDED_ATTR, True)


__all__ = [
    "REARM_ATTR",
    "calling_trainer",
    "end_layerwise_hooks",
    "guard_train",
    "is_hf_galore_optimizer",
    "rearm_layerwise_hooks",
    "unwrap_optimizer",
]
