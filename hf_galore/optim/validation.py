"""Checks shared by the optimizers and ``GaLoreConfig``: name the argument, the value, the valid range."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable

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
    # fidelity options where the references differ (docs/projectors.md):
    # online_pca: project G_t with P_t, then move P (OSD Alg. 1) or move P first
    "osd_order": "project_then_update",
    # refresh="lazy": next refresh at the next multiple of the grown gap (q-galore-torch) or at step + gap
    "lazy_schedule": "multiple",
    # projector="randomized": accept a basis whose estimated captured energy is >= this fraction of
    # the exact SVD's (0 = no check); else up to energy_iters more rounds, then the exact SVD
    "energy_threshold": 0.99,
    "energy_iters": 2,
}

#: Keys every param group gets, low-rank or not.
GROUP_DEFAULTS: dict[str, object] = {
    # a step whose gradients hold a NaN/Inf leaves weights and state untouched (False: as torch AdamW)
    "skip_nonfinite": True,
}
LOWRANK_DEFAULTS.update(GROUP_DEFAULTS)


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


#: Keys torch and its schedulers may put in any param group, beside the optimizer's own
#: hyper-parameters (``lr``, ``betas``, ... come from its ``defaults``); accepted in low-rank groups
#: too, so a group copied from torch.optim.AdamW's ``param_groups`` still works. ``param_names``:
#: named params (torch >= 2.6); ``initial_lr``: every ``LRScheduler``; ``max_lr`` ... ``base_momentum``:
#: OneCycleLR / CyclicLR; ``swa_lr``: SWALR; the flags are torch.optim's implementation switches.
TORCH_GROUP_KEYS: tuple[str, ...] = (
    "params",
    "param_names",
    "initial_lr",
    "max_lr",
    "min_lr",
    "momentum",
    "max_momentum",
    "base_momentum",
    "swa_lr",
    "foreach",
    "fused",
    "capturable",
    "differentiable",
    "maximize",
    "amsgrad",
    "decoupled_weight_decay",
)

#: torch flags that change the update; accepted only with the value hf_galore honours.
_UNSUPPORTED_FLAGS: dict[str, bool] = {"maximize": False, "amsgrad": False}


def check_group_keys(keys: Iterable[str], optimizer_keys: Iterable[str]) -> None:
    """Refuse a key a low-rank group would silently ignore (``update_proj_gp=50`` ran the default 200).

    ``keys`` are the keys the caller wrote (before defaults are filled in);
    ``optimizer_keys`` the optimizer's own hyper-parameters (its ``defaults``).
    Checked once, when the group is added: schedulers add keys later, and
    ``load_state_dict`` restores saved groups without this check.
    """
    valid = sorted({"rank", *LOWRANK_DEFAULTS, *optimizer_keys, *TORCH_GROUP_KEYS})
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise GaLoreConfigError(
                f"unknown key {key!r} in a low-rank param group (a group with `rank`).{hint} "
                f"Valid keys: {', '.join(valid)}"
            )


def check_full_rank_group_keys(keys: Iterable[str], optimizer_keys: Iterable[str]) -> None:
    """Refuse low-rank keys in a group without ``rank``: it would silently train at full rank.

    ``{"params": ..., "rnak": 64, "update_proj_gap": 200}`` is a GaLore group
    whose ``rank`` was misspelt or forgotten; without this check it would run
    as plain AdamW and the user would only notice the memory bill.
    """
    optimizer_keys = set(optimizer_keys)
    lowrank_only = set(LOWRANK_DEFAULTS) - set(GROUP_DEFAULTS) - optimizer_keys - set(TORCH_GROUP_KEYS)
    for key in keys:
        if key in optimizer_keys or key in TORCH_GROUP_KEYS:
            continue
        if difflib.get_close_matches(str(key), ["rank"], n=1, cutoff=0.75):
            raise GaLoreConfigError(
                f"unknown key {key!r} in a param group. Did you mean 'rank'? A group without `rank` "
                "trains at full rank"
            )
    stray = sorted(str(k) for k in keys if k in lowrank_only)
    if stray:
        raise GaLoreConfigError(
            f"a param group without `rank` sets the low-rank key(s) {', '.join(map(repr, stray))}: add `rank` "
            "to project its weights, or drop them (a group without `rank` trains at full rank, exactly like "
            "torch.optim.AdamW)"
        )


def check_torch_flags(group: dict) -> None:
    """Refuse torch.optim flags a low-rank group cannot honour (``maximize=True``, ``amsgrad=True``)."""
    for key, supported in _UNSUPPORTED_FLAGS.items():
        if key in group and bool(group[key]) != supported:
            raise GaLoreConfigError(
                f"`{key}`={group[key]!r} is not supported in a low-rank param group; "
                f"leave it out or set it to {supported!r}"
            )


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
    from ..projectors.online_pca import OSD_ORDERS
    from ..projectors.storage import CODECS
    from .schedules import LAZY_SCHEDULES, REFRESH_POLICIES

    check_positive_int("rank", group["rank"])
    check_positive_int("update_proj_gap", group["update_proj_gap"])
    check_positive("scale", group["scale"])
    check_choice("proj_type", group["proj_type"], PROJ_TYPES)
    check_choice("projector", group["projector"], PROJECTORS)
    check_choice("quant", group["quant"], CODECS)
    check_choice("refresh", group["refresh"], REFRESH_POLICIES)
    check_choice("rotate_moments", group["rotate_moments"], (False, True))
    check_choice("skip_nonfinite", group["skip_nonfinite"], (False, True))
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
    check_choice("osd_order", group["osd_order"], OSD_ORDERS)
    check_choice("lazy_schedule", group["lazy_schedule"], LAZY_SCHEDULES)
    if check_non_negative("energy_threshold", group["energy_threshold"]) > 1:
        raise GaLoreConfigError(
            f"`energy_threshold` must be in [0, 1] (a fraction of the exact SVD's energy), "
            f"got {group['energy_threshold']!r}"
        )
    check_non_negative_int("energy_iters", group["energy_iters"])
