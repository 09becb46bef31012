"""Param-group checks shared by the optimizers and ``GaLoreConfig``: name the argument, the value, the valid range.

The low-rank group keys are not listed here: the algorithm declares its own
(:data:`CORE_OPTIONS`) and every registered component its own (``options``);
:func:`lowrank_options` joins them from the registries.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping

from ..declare import (
    Option,
    check_beta,
    check_bool,
    check_choice,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    merge_options,
    one_of,
)
from ..errors import GaLoreConfigError
from ..projectors import PROJECTORS
from ..projectors.geometry import PROJ_TYPES
from ..projectors.storage import CODECS
from ..registry import declared_options
from .accumulation import ACCUMULATE_DTYPES, ACCUMULATE_MODES
from .schedules import REFRESH_POLICIES


def _registered(registry) -> object:
    def check(name: str, value: object) -> object:
        return check_choice(name, value, registry)

    return check


#: The algorithm's own low-rank group keys (GaLore paper §5.1 / galore-torch defaults). Each
#: component declares its own keys next to its code (``options``); :func:`lowrank_options` joins them.
CORE_OPTIONS: tuple[Option, ...] = (
    Option("update_proj_gap", 200, check_positive_int, "optimizer steps between basis refreshes"),
    Option("scale", 0.25, check_positive, "scale alpha of the projected-back update"),
    Option("proj_type", "std", one_of(*PROJ_TYPES), "projected side(s): std, reverse_std, left, right or full"),
    # "auto": exact SVD on small weights, the guarded randomized finder on large ones (projectors/auto.py);
    # "svd" stays the exact SVD on every weight (galore-torch)
    Option("projector", "auto", _registered(PROJECTORS), "how the basis is found (registered projector name)"),
    Option("quant", None, _registered(CODECS), "how the basis is stored: None (dense) or a registered codec"),
    Option("refresh", "fixed", _registered(REFRESH_POLICIES), "when the basis is refreshed (registered policy)"),
    # carry the moments into a refreshed basis (off: galore-torch keeps their coordinates)
    Option("rotate_moments", False, check_bool, "carry the moments into a refreshed basis"),
    # gradient accumulation in the subspace (optim/accumulation.py): auto = in layer-wise mode only
    Option("accumulate", "auto", one_of(*ACCUMULATE_MODES), "accumulate micro-batch gradients: auto, lowrank or full"),
    Option(
        "accumulate_dtype",
        None,
        one_of(*ACCUMULATE_DTYPES),
        "dtype of the subspace accumulators: None (the gradient's) or float32",
    ),
)

#: Keys every param group gets, low-rank or not: a step whose gradients hold a NaN/Inf leaves weights
#: and state untouched (False: as torch AdamW).
_GROUP_OPTIONS = (Option("skip_nonfinite", True, check_bool, "skip a step whose gradients hold NaN/Inf"),)
GROUP_DEFAULTS: dict[str, object] = {option.name: option.default for option in _GROUP_OPTIONS}


def lowrank_options() -> dict[str, Option]:
    """Every key a low-rank group accepts besides ``rank``: the algorithm's, then each registered component's.

    Read from the registries at each call, so a component registered at run
    time (a plugin, a test) is validated, parsed and defaulted like a built-in one.
    """
    return merge_options([("GaLore", CORE_OPTIONS + _GROUP_OPTIONS), *declared_options()])


def lowrank_defaults() -> dict[str, object]:
    """``key -> default`` of :func:`lowrank_options`: what a low-rank group gets when it names only ``rank``."""
    return {name: option.default for name, option in lowrank_options().items()}


class _LiveDefaults(Mapping):
    """:func:`lowrank_defaults` as a read-only mapping that follows the registries."""

    def __getitem__(self, key: str) -> object:
        return lowrank_defaults()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(lowrank_defaults())

    def __len__(self) -> int:
        return len(lowrank_defaults())

    def __repr__(self) -> str:
        return repr(lowrank_defaults())


#: Values a low-rank param group gets when it names only ``rank`` (a live view of :func:`lowrank_defaults`).
LOWRANK_DEFAULTS: Mapping[str, object] = _LiveDefaults()


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
    check_bool("stochastic_rounding", group.get("stochastic_rounding", True))
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

#: torch.optim's flags, with torch.optim.AdamW's defaults: every member's constructor takes them and
#: every group has them (as in torch), each either honoured or refused by name (:func:`check_torch_flags`).
TORCH_FLAG_DEFAULTS: dict[str, object] = {
    "maximize": False,
    "foreach": None,
    "fused": None,
    "capturable": False,
    "differentiable": False,
    "amsgrad": False,
    "decoupled_weight_decay": True,
}

#: ``flag -> (values honoured, why another value cannot be)``: what every member accepts; a member
#: widens an entry where it honours more (``GaLoreAdamW`` runs torch's fused and multi-tensor kernels).
BASE_TORCH_FLAGS: dict[str, tuple[tuple[object, ...], str]] = {
    # minimising -f: the gradient (full-rank) or its projection R (low-rank; the subspace of -G is G's) is negated
    "maximize": ((False, True), ""),
    "amsgrad": ((False,), "AMSGrad's running maximum of the second moment is not implemented"),
    "capturable": ((False,), "CUDA-graph capture is not supported (the step counters live on the CPU)"),
    "differentiable": ((False,), "the update runs under torch.no_grad(); it cannot be differentiated through"),
    "decoupled_weight_decay": ((True,), "weight decay is always decoupled, W <- W*(1 - lr*wd), as in AdamW"),
    "foreach": ((None, False), "this optimizer updates one tensor at a time"),
    "fused": ((None, False), "this optimizer has no fused kernel"),
}


def torch_flags_from(kwargs: Mapping[str, object], owner: str) -> dict[str, object]:
    """The torch.optim flags among a constructor's ``**torch_flags``, with torch's defaults for the rest.

    Any other keyword is a ``TypeError`` naming it, as Python gives for an
    unknown keyword argument (with the flags accepted listed).
    """
    unknown = sorted(set(kwargs) - set(TORCH_FLAG_DEFAULTS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(TORCH_FLAG_DEFAULTS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise TypeError(
            f"{owner}.__init__() got an unexpected keyword argument {unknown[0]!r}.{hint} Besides its own "
            f"hyper-parameters it takes torch.optim's flags: {', '.join(TORCH_FLAG_DEFAULTS)}"
        )
    return {**TORCH_FLAG_DEFAULTS, **kwargs}


def check_torch_flags(group: Mapping, accepted: Mapping[str, tuple[tuple[object, ...], str]], owner: str) -> None:
    """Refuse a torch.optim flag value ``owner`` cannot honour, naming the flag, the value and the reason.

    Checked for every group, low-rank and full-rank alike: a flag is never
    accepted and then ignored (``maximize=True`` in a full-rank group once
    descended where torch.optim.AdamW ascends).
    """
    for key, (values, reason) in accepted.items():
        if key not in group:
            continue
        value = group[key]
        if not any(value is v or (type(value) is type(v) and value == v) for v in values):
            shown = ", ".join(repr(v) for v in values)
            raise GaLoreConfigError(
                f"`{key}`={value!r} is not supported by {owner}: {reason}. Leave it out or set it to {shown}"
            )
    if group.get("fused") and group.get("foreach"):
        raise GaLoreConfigError("`fused`=True and `foreach`=True cannot be set together (as in torch.optim)")


def check_group_keys(keys: Iterable[str], optimizer_keys: Iterable[str]) -> None:
    """Refuse a key a low-rank group would silently ignore (``update_proj_gp=50`` ran the default 200).

    ``keys`` are the keys the caller wrote (before defaults are filled in);
    ``optimizer_keys`` the optimizer's own hyper-parameters (its ``defaults``).
    Checked once, when the group is added: schedulers add keys later, and
    ``load_state_dict`` restores saved groups without this check.
    """
    valid = sorted({"rank", *lowrank_options(), *optimizer_keys, *TORCH_GROUP_KEYS})
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
    lowrank_only = set(lowrank_options()) - set(GROUP_DEFAULTS) - optimizer_keys - set(TORCH_GROUP_KEYS)
    for key in keys:
        if key in optimizer_keys or key in TORCH_GROUP_KEYS:
            continue
        if difflib.get_close_matches(str(key), ["rank"], n=1, cutoff=0.75):
            raise GaLoreConfigError(
                f"unknown key {key!r} in a param group. Did you mean 'rank'? A group without `rank` trains at full rank"
            )
    stray = sorted(str(k) for k in keys if k in lowrank_only)
    if stray:
        raise GaLoreConfigError(
            f"a param group without `rank` sets the low-rank key(s) {', '.join(map(repr, stray))}: add `rank` "
            "to project its weights, or drop them (a group without `rank` trains at full rank, exactly like "
            "torch.optim.AdamW)"
        )


def check_lowrank_keys(group: dict) -> None:
    """Validate the GaLore keys of a param group that has ``rank`` (every declared option, defaults filled)."""
    check_positive_int("rank", group["rank"])
    for name, option in lowrank_options().items():
        option.validate(group[name])


__all__ = [
    "BASE_TORCH_FLAGS",
    "CORE_OPTIONS",
    "GROUP_DEFAULTS",
    "LOWRANK_DEFAULTS",
    "ROUNDING_DEFAULTS",
    "TORCH_FLAG_DEFAULTS",
    "TORCH_GROUP_KEYS",
    "check_beta",
    "check_choice",
    "check_full_rank_group_keys",
    "check_group_keys",
    "check_lowrank_keys",
    "check_non_negative",
    "check_non_negative_int",
    "check_positive",
    "check_positive_int",
    "check_rounding_keys",
    "check_torch_flags",
    "lowrank_defaults",
    "lowrank_options",
    "torch_flags_from",
]
