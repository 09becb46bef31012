"""What a component declares about itself: its options and its state.

A projector, basis codec, refresh policy or base optimizer says once, next to
its code, which param-group keys it reads (:class:`Option`: default, check,
help, how ``optim_args`` text is parsed) and which tensors it keeps per weight
(:class:`StateTensor`: shape and dtype, hence bytes; :class:`StateKey`: how a
base optimizer's entry shards under FSDP2 and rotates with the basis).
Validation, ``GaLoreConfig``, ``estimate_memory``, the start-up summary and
the engines read these declarations from the registries, so adding a
component touches no central table (docs/architecture.md, "Adding a component").

The checks below are shared by every declaration: each names the key, the
bad value and the valid range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import GaLoreConfigError, format_choices

#: ``check(name, value)`` raises :class:`GaLoreConfigError` naming ``name`` when ``value`` is invalid.
Check = Callable[[str, Any], object]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


# ----------------------------------------------------------------------- checks
def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise GaLoreConfigError(f"`{name}` must be a positive integer (>= 1), got {value!r}")
    return int(value)


def check_non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise GaLoreConfigError(f"`{name}` must be an integer >= 0, got {value!r}")
    return int(value)


def check_non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise GaLoreConfigError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise GaLoreConfigError(f"`{name}` must be a finite number > 0, got {value!r}")
    return float(value)


def check_beta(name: str, value: object) -> float:
    """A number in [0, 1); a one-element real tensor counts as its value, as torch.optim accepts."""
    number = value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        number = float(value)
    if isinstance(number, bool) or not isinstance(number, numbers.Real) or not 0.0 <= number < 1.0:
        raise GaLoreConfigError(f"`{name}` must be in [0, 1), got {value!r}")
    return float(number)


def check_choice(name: str, value: object, choices: Iterable[object]) -> object:
    if value not in choices:
        raise GaLoreConfigError(f"`{name}` must be one of {format_choices(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise GaLoreConfigError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_fraction(name: str, value: object) -> float:
    """A number in [0, 1]."""
    if check_non_negative(name, value) > 1:
        raise GaLoreConfigError(f"`{name}` must be in [0, 1], got {value!r}")
    return float(value)


def one_of(*choices: object) -> Check:
    """A check accepting exactly ``choices`` (a fixed set; for a registry pass it as ``choices``)."""

    def check(name: str, value: object) -> object:
        return check_choice(name, value, choices)

    check.choices = choices  # type: ignore[attr-defined]
    return check


def at_least(bound: float) -> Check:
    """A check accepting finite numbers >= ``bound`` (``bound`` > 0)."""

    def check(name: str, value: object) -> float:
        if check_positive(name, value) < bound:
            raise GaLoreConfigError(f"`{name}` must be >= {bound}, got {value!r}")
        return float(value)

    return check


# ---------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """A param-group key a component reads: its default, its check and a one-line help.

    ``optim_args`` text is parsed by the type of ``default`` (bool, int,
    float, str; a ``None`` default takes text or ``none``).
    """

    name: str
    default: Any
    check: Check
    help: str = ""

    def validate(self, value: object) -> None:
        """Raise :class:`GaLoreConfigError` naming the key when ``value`` is not acceptable."""
        self.check(self.name, value)

    def parse(self, raw: str) -> Any:
        """The value of ``optim_args`` text ``raw`` (``"16"`` → 16 for an int option)."""
        return parse_text(self.name, raw, self.default)


def parse_text(name: str, raw: str, default: Any) -> Any:
    """Parse ``raw`` by the type of ``default`` (``None`` defaults accept text or none)."""
    if default is None:
        return None if raw.lower() in _NONE else raw
    if isinstance(default, bool):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise GaLoreConfigError(f"`{name}` in `optim_args` must be true or false, got {raw!r}")
    if isinstance(default, (int, float)):
        kind = type(default)
        try:
            return kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise GaLoreConfigError(f"`{name}` in `optim_args` must be {what}, got {raw!r}") from None
    return raw


def merge_options(sources: Iterable[tuple[str, Iterable[Option]]]) -> dict[str, Option]:
    """``name -> Option`` over every ``(component, options)``; one key declared two ways is an error.

    Two components may share a key only with the same declaration (the INT8
    and INT4 codecs share ``quant_group_size``).
    """
    merged: dict[str, Option] = {}
    owner: dict[str, str] = {}
    for component, options in sources:
        for option in options:
            known = merged.get(option.name)
            if known is not None and known != option:
                raise GaLoreConfigError(
                    f"the group key {option.name!r} is declared by both {owner[option.name]} (default "
                    f"{known.default!r}) and {component} (default {option.default!r}); give one of them another name"
                )
            merged.setdefault(option.name, option)
            owner.setdefault(option.name, component)
    return merged


# ------------------------------------------------------------------------ state
@dataclass(frozen=True)
class StateTensor:
    """One per-weight state tensor a component keeps: its shape and dtype (so its bytes)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def layout_bytes(layout: Mapping[str, StateTensor]) -> int:
    """Bytes of every tensor in a declared state layout."""
    return sum(entry.nbytes for entry in layout.values())


@dataclass(frozen=True)
class StateKey:
    """What a base optimizer declares about one of its state keys, beyond its shape.

    Attributes:
        dtype: the stored dtype; ``None`` means the gradient's dtype.
        follows_gradient: the entry has the (low-rank) gradient's shape and
            index order, so under FSDP2 it shards exactly as the gradient
            does and checkpoints save it as a ``DTensor`` (Adam's moments;
            not 8-bit blocks, factored statistics or transposed layouts).
        rotate: how it is carried into a refreshed basis under
            ``rotate_moments``: ``"linear"`` (first moments: ``C M``),
            ``"squared"`` (second moments: ``(C∘C) V``) or ``None`` (kept
            as is, with a one-time warning).
    """

    dtype: torch.dtype | None = None
    follows_gradient: bool = False
    rotate: Literal["linear", "squared"] | None = None


__all__ = [
    "Check",
    "Option",
    "StateKey",
    "StateTensor",
    "at_least",
    "check_beta",
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_non_negative",
    "check_non_negative_int",
    "check_positive",
    "check_positive_int",
    "layout_bytes",
    "merge_options",
    "one_of",
    "parse_text",
]
