"""The one version-gated shim for transformers: how an ``optim`` name reaches hf_galore's builders.

Everything else hf_galore does in the Trainer goes through public surfaces on
every supported release (``>=4.47,<6``): callbacks (``GaLoreCallback``: checks,
logs, the layer-wise ``grad_norm``), the optimizer, ``TrainerState``. Only the
optimizer dispatch differs by release line, and it is decided here, by version:

* **transformers >= 5** (:data:`OPTIMIZER_TABLE_SINCE`): ``Trainer.get_optimizer_cls_and_kwargs``
  looks the optim name up in ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``.
  hf_galore puts its handlers in that table and replaces **nothing** on
  ``Trainer``. A 5.x release without the table is an error (never a silent
  fallback to transformers' galore-torch path).
* **transformers 4.x**: there is no table (the static method is one if/elif
  chain), so hf_galore wraps the public static ``Trainer.get_optimizer_cls_and_kwargs``:
  GaLore names go to hf_galore, every other name to the original.

Either way a rename in a later release cannot go unnoticed: the hook then
fails with a warning at import, and ``GaLoreCallback`` stops a training that
asked for ``optim="galore_*"`` but got another optimizer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from packaging.version import Version

from .errors import GaLoreConfigError, UnsupportedSetupError
from .trainer_args import EXPLICIT_PATH

#: First transformers release whose Trainer dispatches optim names through ``_OPTIMIZER_HANDLERS``.
OPTIMIZER_TABLE_SINCE = Version("5.0.0")
#: Attribute marking our wrapper of the 4.x static method (holds the original).
ORIGINAL_ATTR = "__hf_galore_original__"


def transformers_version() -> Version:
    """The imported transformers' version (``0`` when it is not imported: nothing to hook then)."""
    module = sys.modules.get("transformers")
    return Version(getattr(module, "__version__", "0"))


def uses_optimizer_table(version: Version | str | None = None) -> bool:
    """True on the release lines whose Trainer dispatches through the handler table (>= 5)."""
    version = transformers_version() if version is None else Version(str(version))
    return version.release >= OPTIMIZER_TABLE_SINCE.release


def check_optim_args_split(optim_args: str | None, version: Version | str | None = None) -> None:
    """Refuse, with hf_galore's words, an ``optim_args`` that transformers >= 5 cannot split.

    On the table route transformers splits ``optim_args`` into ``key=value``
    pairs before any handler runs and fails with a bare ``ValueError`` on an
    entry without exactly one ``=`` (an empty one after a trailing comma, which
    hf_galore's own parser skips). ``GaLoreCallback`` calls this at
    ``Trainer(...)``, after hf_galore's own checks. 4.x never splits it.
    """
    if not optim_args or not isinstance(optim_args, str) or not uses_optimizer_table(version):
        return
    for item in optim_args.replace(" ", "").split(","):
        if item.count("=") != 1:
            raise GaLoreConfigError(
                f"`optim_args`={optim_args!r} has the entry {item!r}, which transformers "
                f"{version or transformers_version()} cannot split into one key=value (it parses "
                "`optim_args` itself before hf_galore reads it): remove empty entries such as a trailing "
                "comma, and write each entry as key=value"
            )


def _wrap_static(trainer_cls: type, claims: Callable[[Any], bool], build: Callable[[Any, Any], tuple]) -> None:
    """transformers 4.x: wrap ``Trainer.get_optimizer_cls_and_kwargs`` (public, static) for our names only."""
    raw = trainer_cls.__dict__.get("get_optimizer_cls_and_kwargs")
    if not isinstance(raw, staticmethod):
        raise UnsupportedSetupError(
            "this transformers version has no static `Trainer.get_optimizer_cls_and_kwargs`, the hook hf_galore "
            f"uses for `optim='galore_*'` on transformers 4.x; build the optimizer explicitly: {EXPLICIT_PATH}"
        )
    original = raw.__func__
    if hasattr(original, ORIGINAL_ATTR):
        return

    def get_optimizer_cls_and_kwargs(args, model=None):
        if claims(args):
            return build(args, model)
        return original(args, model)

    get_optimizer_cls_and_kwargs.__doc__ = original.__doc__
    setattr(get_optimizer_cls_and_kwargs, ORIGINAL_ATTR, original)
    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def hook_optimizer_dispatch(
    trainer_module: ModuleType,
    claims: Callable[[Any], bool],
    build: Callable[[Any, Any], tuple],
    version: Version | str | None = None,
) -> dict | None:
    """Route GaLore optim names to hf_galore on the release line of ``version`` (default: the imported one).

    ``trainer_module`` is ``transformers.trainer``; ``claims(args)`` says
    whether ``args.optim`` is ours and ``build(args, model)`` returns
    ``(optimizer class, kwargs)`` for it. Returns the handler table the
    caller fills (transformers >= 5), or ``None`` after wrapping the 4.x
    static method. Raises :class:`UnsupportedSetupError` when the release
    lacks what its line should have.
    """
    if uses_optimizer_table(version):
        table_module = sys.modules.get("transformers.trainer_optimizer")
        table = getattr(table_module, "_OPTIMIZER_HANDLERS", None)
        if not isinstance(table, dict):
            raise UnsupportedSetupError(
                f"transformers {version or transformers_version()} has no optimizer handler table "
                "(`transformers.trainer_optimizer._OPTIMIZER_HANDLERS`), which hf_galore uses for "
                f"`optim='galore_*'` on transformers >= {OPTIMIZER_TABLE_SINCE}; build the optimizer explicitly: "
                f"{EXPLICIT_PATH}"
            )
        return table
    trainer_cls = getattr(trainer_module, "Trainer", None)
    if trainer_cls is None:
        raise UnsupportedSetupError(
            f"`{trainer_module.__name__}` has no `Trainer`; build the optimizer explicitly: {EXPLICIT_PATH}"
        )
    _wrap_static(trainer_cls, claims, build)
    return None


__all__ = [
    "OPTIMIZER_TABLE_SINCE",
    "check_optim_args_split",
    "hook_optimizer_dispatch",
    "transformers_version",
    "uses_optimizer_table",
]
