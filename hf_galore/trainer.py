"""Trainer integration: ``TrainingArguments(optim="galore_adamw")`` builds hf_galore's optimizers.

``import hf_galore`` installs a post-import hook: when ``transformers.trainer``
is imported (now, or later — importing it costs seconds, so ``import
hf_galore`` does not do it) the hook runs (:func:`register_with_transformers`
runs it on demand) and

* routes the GaLore optim names (galore_adamw, galore_adamw_8bit,
  galore_adafactor and the ``*_layerwise`` ones) to hf_galore's builders —
  transformers' own GaLore path, which needs galore-torch, passes only the
  learning rate and silently drops unknown ``optim_args`` keys, is never
  reached for these names. How depends on the release line, and is decided in
  one place (:mod:`hf_galore.compat_transformers`): on transformers >= 5 the
  builders go into its optimizer handler table and no ``Trainer`` attribute is
  replaced; on 4.x the public static ``Trainer.get_optimizer_cls_and_kwargs``
  is wrapped;
* appends :class:`~hf_galore.callback.GaLoreCallback` to the Trainer's default
  callbacks (it stays inert unless a GaLore optimizer is in use).

Optimizers are data: ``TRAINER_OPTIMIZERS`` maps an optim name to a builder
``(param_groups, hyper_params, config) -> (optimizer class, kwargs)``;
:func:`register_trainer_optimizer` adds one (names must be members of
transformers' ``OptimizerNames`` to be accepted by ``TrainingArguments``).

Where the hook cannot be installed (a release without what its line should
have), a warning says so at import of
``transformers.trainer`` and the explicit path always works::

    Trainer(..., optimizers=(hf_galore.create_optimizer(model, args), None))
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.optim import Optimizer

from .compat_transformers import hook_optimizer_dispatch
from .config import GaLoreConfig
from .errors import GaLoreConfigError, format_choices
from .optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .targets import GaLorePlan, plan_param_groups
from .trainer_args import (
    EXPLICIT_PATH,
    HOOK_STATE,
    TRAINER_OPTIMIZERS,
    TRANSFORMERS_GALORE_NAMES,
    HyperParams,
    OptimizerBuilder,
    TrainerOptimizer,
    check_supported_engine,
    config_from_training_args,
    hook_error,
    is_galore_optim,
    lookup_trainer_optimizer,
    optim_name,
    register_trainer_optimizer,
)

if TYPE_CHECKING:
    from transformers import TrainingArguments


def _adam_kwargs(hp: HyperParams) -> dict[str, Any]:
    return {
        "lr": hp.lr,
        "betas": hp.betas,
        "eps": hp.eps,
        "weight_decay": hp.weight_decay,
    }


def _build_adamw(groups, hp, config):
    return GaLoreAdamW, _adam_kwargs(hp)


def _build_adamw_8bit(groups, hp, config):
    return GaLoreAdamW8bit, _adam_kwargs(hp)


def _build_adafactor(groups, hp, config):
    # As transformers' "adafactor": the Trainer's learning rate and schedule, not Adafactor's relative step.
    return GaLoreAdafactor, {
        "lr": hp.lr,
        "relative_step": False,
        "scale_parameter": False,
        "warmup_init": False,
        "weight_decay": hp.weight_decay,
    }


register_trainer_optimizer("galore_adamw", _build_adamw)
register_trainer_optimizer("galore_adamw_8bit", _build_adamw_8bit, requires=("bitsandbytes.functional",))
register_trainer_optimizer("galore_adafactor", _build_adafactor)


def build_optimizer_cls_and_kwargs(
    model: nn.Module, name: str, config: GaLoreConfig, hp: HyperParams
) -> tuple[type[Optimizer], dict[str, Any], GaLorePlan]:
    """The optimizer class, its kwargs including ``params`` (param groups), and the plan behind them."""
    entry = lookup_trainer_optimizer(name, config)
    plan = plan_param_groups(model, config, weight_decay=hp.weight_decay)
    cls, kwargs = entry.build(plan.groups, hp, config)
    return cls, {"params": plan.groups, **kwargs}, plan


def trainer_optimizer_cls_and_kwargs(args: TrainingArguments, model: nn.Module | None) -> tuple[type, dict]:
    """What ``Trainer.get_optimizer_cls_and_kwargs`` returns for a GaLore optim name."""
    name = optim_name(args)
    if model is None:
        raise GaLoreConfigError(f"`optim`={name!r} needs the model to choose the projected weights; pass `model=`")
    check_supported_engine(args)
    config = config_from_training_args(args)
    cls, kwargs, _ = build_optimizer_cls_and_kwargs(model, name, config, HyperParams.from_training_args(args))
    return cls, kwargs


def create_optimizer(
    model: nn.Module,
    args: TrainingArguments | GaLoreConfig | None = None,
    *,
    optim: str | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
) -> Optimizer:
    """Build the hf_galore optimizer for ``model``.

    ``args`` is a ``TrainingArguments`` (its ``optim``, ``optim_args``,
    ``optim_target_modules``, ``learning_rate``, ``weight_decay``,
    ``adam_beta1/2``, ``adam_epsilon`` are used; keywords override them) or
    a ``GaLoreConfig`` (``optim`` defaults to "galore_adamw"). Use it with
    any transformers version: ``Trainer(..., optimizers=(create_optimizer(model, args), None))``.
    """
    if isinstance(args, GaLoreConfig):
        config, name, hp = args, optim or "galore_adamw", HyperParams()
    elif args is None:
        raise GaLoreConfigError("`args` must be a TrainingArguments or a GaLoreConfig, got None")
    else:
        name = optim or optim_name(args)
        if not is_galore_optim(name):
            raise GaLoreConfigError(
                f"`optim`={name!r} is not a GaLore optimizer; choose one of {format_choices(TRAINER_OPTIMIZERS)}"
            )
        check_supported_engine(args)
        config, hp = (
            config_from_training_args(args),
            HyperParams.from_training_args(args),
        )
    changes = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
    hp = HyperParams(**{**hp.__dict__, **{k: v for k, v in changes.items() if v is not None}})
    cls, kwargs, plan = build_optimizer_cls_and_kwargs(model, name, config, hp)
    optimizer = cls(kwargs.pop("params"), **kwargs)
    optimizer.galore_plan = plan  # read by GaLoreCallback's summary; not part of the state
    return optimizer


# ------------------------------------------------------------------- hooking
def _claims(args: Any) -> bool:
    return is_galore_optim(optim_name(args))


def _handler(ctx: Any) -> tuple[type, dict]:
    """``_OPTIMIZER_HANDLERS`` entry: re-reads ``optim_args`` itself (transformers' parse drops key checks)."""
    return trainer_optimizer_cls_and_kwargs(ctx.args, ctx.model)


def _install_handlers() -> None:
    table = HOOK_STATE.handlers_table
    if table is None:
        return
    for name in set(TRAINER_OPTIMIZERS) | set(TRANSFORMERS_GALORE_NAMES):
        table[name] = _handler


HOOK_STATE.on_register = _install_handlers


def _patch_trainer_module(module: ModuleType) -> None:
    # transformers >= 5: handlers in its optimizer table, nothing on Trainer replaced; 4.x: the
    # public static `get_optimizer_cls_and_kwargs` wrapped (hf_galore.compat_transformers decides)
    table = hook_optimizer_dispatch(module, _claims, trainer_optimizer_cls_and_kwargs)
    if table is not None:
        HOOK_STATE.handlers_table = table
        _install_handlers()
    from .callback import AutoGaLoreCallback

    # the callback checks layer-wise settings and logs the real grad_norm (public callback events)
    defaults = getattr(module, "DEFAULT_CALLBACKS", None)
    if isinstance(defaults, list) and AutoGaLoreCallback not in defaults:
        defaults.append(AutoGaLoreCallback)
    HOOK_STATE.installed = True


def register_with_transformers() -> bool:
    """Install the Trainer hook now (imports ``transformers.trainer``); True on success.

    On failure the reason is kept in :func:`hook_error` and a warning names
    the explicit alternative; nothing in transformers is left half-patched
    that would silently pick another optimizer for our names.
    """
    if HOOK_STATE.installed:
        return True
    try:
        import transformers.trainer as module
    except ImportError as exc:
        HOOK_STATE.error = f"transformers.trainer could not be imported: {exc}"
        return False
    return _on_trainer_import(module)


def _on_trainer_import(module: ModuleType) -> bool:
    if HOOK_STATE.installed:
        return True
    try:
        _patch_trainer_module(module)
    # Never break `import transformers.trainer` over our hook; say loudly what to do instead.
    except Exception as exc:  # noqa: BLE001
        HOOK_STATE.error = str(exc)
        warnings.warn(
            f"hf_galore could not hook into transformers {getattr(sys.modules.get('transformers'), '__version__', '?')}"
            f" ({exc}); `optim='galore_*'` will NOT use hf_galore. Use {EXPLICIT_PATH}",
            UserWarning,
            stacklevel=2,
        )
        return False
    HOOK_STATE.error = None
    return True


class _PostImportLoader(importlib.abc.Loader):
    """Runs the real loader, then our hook on the fresh module."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[ModuleType], Any]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):  # get_source, is_package, ... for tools that ask
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Calls ``callback(module)`` right after ``fullname`` is first imported, then removes itself."""

    def __init__(self, fullname: str, callback: Callable[[ModuleType], Any]) -> None:
        self.fullname = fullname
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.fullname:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None:
            return None
        _remove_finder(self)
        spec.loader = _PostImportLoader(spec.loader, self.callback)
        return spec


def _remove_finder(finder: object) -> None:
    try:
        sys.meta_path.remove(finder)
    except ValueError:
        pass


def install_import_hook() -> None:
    """Hook the Trainer as soon as ``transformers.trainer`` is (or already was) imported."""
    module = sys.modules.get("transformers.trainer")
    if module is not None:
        _on_trainer_import(module)
        return
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder("transformers.trainer", _on_trainer_import))


__all__ = [
    "EXPLICIT_PATH",
    "TRAINER_OPTIMIZERS",
    "TRANSFORMERS_GALORE_NAMES",
    "HyperParams",
    "OptimizerBuilder",
    "TrainerOptimizer",
    "check_supported_engine",
    "config_from_training_args",
    "create_optimizer",
    "hook_error",
    "install_import_hook",
    "register_trainer_optimizer",
    "register_with_transformers",
]
