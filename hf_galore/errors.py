"""One exception hierarchy for the package, so callers can catch ``HfGaloreError``.

Every subclass that signals bad input also derives from :class:`ValueError`, so
code written against plain PyTorch optimizers (which raise ``ValueError``)
keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable


class HfGaloreError(Exception):
    """Base class of every error raised on purpose by hf_galore."""


class GaLoreConfigError(HfGaloreError, ValueError):
    """A hyper-parameter, param-group key or config field has an invalid value."""


class StateMismatchError(HfGaloreError, ValueError):
    """Optimizer state (a checkpoint, a foreign ``state_dict``) does not fit this optimizer or its groups."""


class UnsupportedSetupError(HfGaloreError, RuntimeError):
    """The training setup (engine, tensor kind, library version) cannot be honoured."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (huggingface_hub puts the useful part on the second), cut to ``limit``.

    What the package's one-line errors quote of a library's exception.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KeyError):  # str(KeyError('x')) is just "'x'"
        text = f"KeyError {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_choices(choices: Iterable[object]) -> str:
    """Render a set of valid values the same way in every message."""
    return ", ".join(repr(c) for c in sorted(choices, key=str))
