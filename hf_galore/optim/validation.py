"""Checks shared by the optimizers and ``GaLoreConfig``: name the argument, the value, the valid range."""

from __future__ import annotations

import math
import numbers

from ..errors import GaLoreConfigError, format_choices

#: Values a low-rank param group gets when it names only ``rank`` (GaLore paper §5.1 / galore-torch).
LOWRANK_DEFAULTS: dict[str, object] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "projector": "svd",
    "quant": None,
    "refresh": "fixed",
}


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise GaLoreConfigError(f"`{name}` must be a positive integer (>= 1), got {value!r}")
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
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise GaLoreConfigError(f"`{name}` must be in [0, 1), got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices) -> object:
    if value not in choices:
        raise GaLoreConfigError(f"`{name}` must be one of {format_choices(choices)}, got {value!r}")
    return value


def check_lowrank_keys(group: dict) -> None:
    """Validate the GaLore keys of a param group that has ``rank``."""
    from ..projectors import PROJECTORS
    from ..projectors.geometry import PROJ_TYPES
    from ..projectors.storage import CODECS
    from .schedules import REFRESH_POLICIES

    check_positive_int("rank", group["rank"])
    check_positive_int("update_proj_gap", group["update_proj_gap"])
    check_positive("scale", group["scale"])
    check_choice("proj_type", group["proj_type"], PROJ_TYPES)
    check_choice("projector", group["projector"], PROJECTORS)
    check_choice("quant", group["quant"], CODECS)
    check_choice("refresh", group["refresh"], REFRESH_POLICIES)
