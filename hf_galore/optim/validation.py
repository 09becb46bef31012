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
    # carry the moments into a refreshed basis (off: galore-torch keeps their coordinates)
    "rotate_moments": False,
    # quant="int8"/"int4": values per scale group (Q-GaLore's default)
    "quant_group_size": 256,
    # projector="randomized" (Halko et al. 2011): extra columns, cold / warm rounds, RNG seed
    "oversample": 8,
    "power_iters": 2,
    "warm_iters": 1,
    "proj_seed": 0,
    # projector="online_pca" (OSD, arXiv:2408.12857): lr of P = osd_alpha x lr; orthogonality weight
    "osd_alpha": 5.0,
    "osd_lambda": 0.1,
    # refresh="lazy" (Q-GaLore, arXiv:2407.08296): cosine threshold, gap growth, FIFO length
    "lazy_threshold": 0.4,
    "lazy_gamma": 2.0,
    "lazy_queue": 5,
}


#: Keys of every param group, low-rank or full-rank (docs/optimizers.md, "Stochastic rounding").
ROUNDING_DEFAULTS: dict[str, object] = {
    # bf16 / fp16 weights: write updates with unbiased stochastic rounding (off: round to nearest,
    # bit-identical to galore-torch and to hf_galore before the option existed); float32 weights ignore it
    "stochastic_rounding": True,
    # seed of the rounding noise (mixed with the parameter's position and its step)
    "sr_seed": 0,
}


def check_rounding_keys(group: dict) -> None:
    """Validate the stochastic-rounding keys of any param group (missing keys take their defaults)."""
    value = group.get("stochastic_rounding", True)
    if not isinstance(value, bool):
        raise GaLoreConfigError(f"`stochastic_rounding` must be True or False, got {value!r}")
    check_non_negative_int("sr_seed", group.get("sr_seed", 0))


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
    check_choice("rotate_moments", group["rotate_moments"], (False, True))
    check_positive_int("quant_group_size", group["quant_group_size"])
    check_non_negative_int("oversample", group["oversample"])
    check_non_negative_int("power_iters", group["power_iters"])
    check_non_negative_int("warm_iters", group["warm_iters"])
    check_non_negative_int("proj_seed", group["proj_seed"])
    check_positive("osd_alpha", group["osd_alpha"])
    check_non_negative("osd_lambda", group["osd_lambda"])
    check_non_negative("lazy_threshold", group["lazy_threshold"])
    if check_positive("lazy_gamma", group["lazy_gamma"]) < 1:
        raise GaLoreConfigError(f"`lazy_gamma` must be >= 1 (the gap never shrinks), got {group['lazy_gamma']!r}")
    check_positive_int("lazy_queue", group["lazy_queue"])
