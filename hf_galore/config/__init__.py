"""``GaLoreConfig``: every GaLore setting in one validated, serialisable dataclass.

GaLore (Zhao et al., 2024, arXiv:2403.03507) needs a handful of settings per
projected weight (rank, refresh gap, scale, ...) plus the choice of which
weights are projected. ``GaLoreConfig`` holds them, checks them in
``__post_init__`` (so a bad value fails before any training starts), parses
the Trainer's ``optim_args`` string and round-trips through JSON.

How a setting flows through the package (one place to add it):

* Low-rank param-group keys are declared once, by their component
  (``options``: default, check, help; the algorithm's own in
  ``optim/validation.CORE_OPTIONS``) and read from the registries
  (``lowrank_options``). A dataclass field with the same name (``rank``, ``scale``, ...) is
  copied into every low-rank group by :meth:`GaLoreConfig.group_options`
  (used by ``targets.galore_param_groups``) and validated by
  ``check_lowrank_keys`` in ``__post_init__``; no per-field wiring.
* A group key without a field of its own (e.g. ``oversample`` of the
  randomized projector) is still settable: ``optim_args="oversample=16"``
  or ``GaLoreConfig(options={"oversample": 16})``; its ``optim_args`` text is
  parsed by the type of its default (bool, int, float, str, ``none``).
  Promote it to a documented field by adding one dataclass field.
* ``metadata`` holds only ``help``, and ``nargs`` for the list fields
  (``HfArgumentParser`` passes metadata to argparse, so other keys would
  break it); checks of the fields that are not group keys live in
  ``_FIELD_CHECKS``.
* Every field and group key is accepted by :meth:`GaLoreConfig.from_optim_args`
  and :meth:`GaLoreConfig.from_dict`; unknown keys are errors naming the valid ones.

The fields and their checks live here; the text forms (the ``optim_args``
grammar, typed values, ``--options`` JSON) in :mod:`hf_galore.config.text`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..declare import parse_text
from ..errors import GaLoreConfigError
from ..optim.validation import (
    CORE_OPTIONS,
    GROUP_DEFAULTS,
    ROUNDING_DEFAULTS,
    check_choice,
    check_lowrank_keys,
    check_rounding_keys,
    lowrank_defaults,
    lowrank_options,
)
from .text import options_from_text, parse_typed, split_optim_args

#: Values of ``small_weights``: what happens to a matched weight whose smaller dimension is <= rank.
SMALL_WEIGHT_POLICIES = ("full_rank", "error")

#: The algorithm's group keys that are fields here: their defaults are declared once, in ``CORE_OPTIONS``.
_CORE = {option.name: option for option in CORE_OPTIONS}

def _check_target_spec(name: str, value: object) -> list[str] | str | None:
    """``None``, a regex / ``"all-linear"`` string, or a non-empty list of module names."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise GaLoreConfigError(f"`{name}` must not be an empty string; use None, a list of names or a regex")
        return "all-linear" if value.replace("_", "-") == "all-linear" else value
    if isinstance(value, (list, tuple, set, frozenset)):
        entries = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if len(entries) == 1 and isinstance(entries[0], str) and entries[0].replace("_", "-") == "all-linear":
            return "all-linear"  # `--target_modules all-linear` on the command line gives a one-item list
        bad = [e for e in entries if not isinstance(e, str) or not e]
        if bad or not entries:
            raise GaLoreConfigError(
                f"`{name}` must be a non-empty list of module names (non-empty strings), got {value!r}"
            )
        return entries
    raise GaLoreConfigError(
        f"`{name}` must be None, a list of module names, a regex string or 'all-linear', got {value!r}"
    )


def _check_small_weights(name: str, value: object) -> str:
    return check_choice(name, value, SMALL_WEIGHT_POLICIES)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise GaLoreConfigError(f"`{name}` must be True or False, got {value!r}")
    return value


@dataclass
class GaLoreConfig:
    """Settings of GaLore-family training (arXiv:2403.03507), validated on construction.

    Args:
        rank: Rank ``r`` of the projection; moments cost ``r·max(m, n)`` per
            ``m×n`` weight instead of ``m·n``. The paper uses 128 (60M–350M
            models) to 512 (1B) and 1024 (7B).
        update_proj_gap: Optimizer steps ``T`` between basis refreshes (paper: 200).
        scale: ``α``, multiplies the projected-back update (paper: 0.25).
        proj_type: Which side(s) are projected: "std" (the smaller side,
            galore-torch's default), "reverse_std", "left", "right", "full".
        projector: How the basis is found ("svd"; other members register more).
        quant: How the basis is stored (None = dense in the weight's dtype).
        refresh: When the basis is refreshed ("fixed" = every ``update_proj_gap`` steps).
        accumulate: Where gradients accumulate over micro-batches: "auto"
            (default: projected into each weight's subspace and freed at once in
            layer-wise mode, in ``.grad`` in regular mode), "lowrank" (in the
            subspace in regular mode too: its hooks project and free every
            gradient), "full" (always in ``.grad``). See docs/layerwise.md.
        target_modules: Which modules' weights are projected: a list whose
            entries are tried as a full name, a dot-bounded suffix (e.g.
            "q_proj"), a full-match regex, then a substring (transformers'
            order; a matched container such as "mlp" selects the Linear /
            Conv1D weights inside it), a full-match regex string, or
            "all-linear" (every linear layer but the output head). See
            ``hf_galore.targets`` and docs/trainer.md.
        exclude_modules: Modules never projected, same rules; excludes win.
        layerwise: Update each weight inside its gradient hook (the
            ``*_layerwise`` optim names set this).
        skip_nonfinite: A step whose gradients hold a NaN or an Inf is
            skipped: weights and all optimizer state stay as they were, the
            skip is counted (``galore/skipped_steps``). ``False`` updates
            anyway, exactly as ``torch.optim.AdamW``. Set on every param group.
        small_weights: A matched weight whose smaller dimension is <= ``rank``
            gains nothing from projection: "full_rank" trains it at full rank
            (warned once, listed in the start-up summary), "error" refuses.
        stochastic_rounding: Write updates into bf16 / fp16 weights with
            unbiased stochastic rounding (every group, low-rank and full-rank);
            ``False`` rounds to nearest, as galore-torch does (bit-parity).
            Float32 weights are unaffected. See docs/optimizers.md.
        options: Further low-rank group keys that have no field here (e.g.
            ``{"oversample": 16}`` for the randomized projector), or that dict
            as JSON text (``--options '{"oversample": 16}'``); each component
            declares its keys and defaults (``options``), and
            ``hf_galore.optim.validation.lowrank_options()`` lists them all.
    """

    rank: int = field(
        default=128,
        metadata={"help": "Rank of the gradient projection."},
    )
    update_proj_gap: int = field(
        default=_CORE["update_proj_gap"].default,
        metadata={
            "help": "Optimizer steps between basis refreshes.",
        },
    )
    scale: float = field(
        default=_CORE["scale"].default,
        metadata={"help": "Scale alpha of the projected-back update."},
    )
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = field(
        default=_CORE["proj_type"].default,
        metadata={"help": "Projected side(s): std, reverse_std, left, right or full."},
    )
    projector: str = field(
        default=_CORE["projector"].default,
        metadata={"help": "How the basis is found (registered projector name)."},
    )
    quant: str | None = field(
        default=_CORE["quant"].default,
        metadata={"help": "How the basis is stored: None (dense) or a registered codec."},
    )
    refresh: str = field(
        default=_CORE["refresh"].default,
        metadata={"help": "Refresh policy (registered name); 'fixed' = every update_proj_gap steps."},
    )
    accumulate: Literal["auto", "lowrank", "full"] = field(
        default=_CORE["accumulate"].default,
        metadata={
            "help": "Where micro-batch gradients accumulate: 'auto' (in the subspace in layer-wise mode, in "
            ".grad otherwise), 'lowrank' (in the subspace, regular optimizer too) or 'full'.",
        },
    )
    # HfArgumentParser reads `list[str] | str | None` as `str`; `nargs` makes `--target_modules
    # q_proj v_proj` a list, as TrainingArguments' `list[str]` fields parse (one value: a one-item list).
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules whose weights are projected: names/suffixes, a full-match regex, or 'all-linear'.",
            "nargs": "+",
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules never projected (same rules as target_modules; excludes win).", "nargs": "+"},
    )
    layerwise: bool = field(
        default=False,
        metadata={"help": "Update each weight in its gradient hook (layer-wise mode)."},
    )
    skip_nonfinite: bool = field(
        default=GROUP_DEFAULTS["skip_nonfinite"],
        metadata={
            "help": "Skip an optimizer step whose gradients hold NaN/Inf, keeping weights and state (False: "
            "update anyway, as torch AdamW). Applies to every param group.",
        },
    )
    small_weights: Literal["full_rank", "error"] = field(
        default="full_rank",
        metadata={
            "help": "Matched weights whose smaller dimension is <= rank: 'full_rank' (train them at full rank) "
            "or 'error'.",
        },
    )
    stochastic_rounding: bool = field(
        default=ROUNDING_DEFAULTS["stochastic_rounding"],
        metadata={"help": "Stochastic rounding of updates into bf16/fp16 weights (False: round to nearest)."},
    )
    # `dict | str | None` as TrainingArguments' dict fields: HfArgumentParser passes the text of
    # `--options '{"oversample": 16}'`, which `__post_init__` reads as JSON.
    options: dict[str, Any] | str | None = field(
        default_factory=dict,
        metadata={"help": "Further low-rank group keys without a field of their own, e.g. {'oversample': 16}."},
    )

    #: Checks (and normalisation) of the fields that are not param-group keys.
    _FIELD_CHECKS: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "target_modules": _check_target_spec,
        "exclude_modules": _check_target_spec,
        "layerwise": _check_bool,
        "small_weights": _check_small_weights,
    }

    def __post_init__(self) -> None:
        for name, check in self._FIELD_CHECKS.items():
            setattr(self, name, check(name, getattr(self, name)))
        self.options = options_from_text(self.options)
        if not isinstance(self.options, dict):
            raise GaLoreConfigError(f"`options` must be a dict of low-rank group keys, got {self.options!r}")
        fields = set(self.field_names())
        for key in self.options:
            if key in fields:
                raise GaLoreConfigError(f"`options` sets {key!r}, which is a field: pass `{key}=` directly")
            if key not in self.group_keys():
                raise self._unknown_key_error(key, "`options`")
        # The optimizers' own checks for every key a low-rank group will carry.
        group = {**lowrank_defaults(), **ROUNDING_DEFAULTS, **self.group_options()}
        check_lowrank_keys(group)
        check_rounding_keys(group)

    # ----------------------------------------------------------------- groups
    @staticmethod
    def group_keys() -> tuple[str, ...]:
        """Keys of a low-rank param group (``rank``, every declared option, ``ROUNDING_DEFAULTS``).

        The ``ROUNDING_DEFAULTS`` keys go into the full-rank groups too
        (:meth:`rounding_options`).
        """
        return ("rank", *lowrank_options(), *ROUNDING_DEFAULTS)

    def group_options(self) -> dict[str, Any]:
        """The keys every low-rank param group gets: fields named like group keys, then ``options``."""
        fields = set(self.field_names())
        out = {key: getattr(self, key) for key in self.group_keys() if key in fields}
        out.update(self.options)
        return out

    def rounding_options(self) -> dict[str, Any]:
        """The stochastic-rounding keys every param group gets, full-rank ones included."""
        options = self.group_options()
        return {key: options[key] for key in ROUNDING_DEFAULTS if key in options}

    # ------------------------------------------------------------- optim_args
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def valid_keys(cls) -> list[str]:
        """Keys accepted by ``optim_args`` / ``from_dict``: the fields and every group key."""
        return sorted(set(cls.field_names()) - {"options"} | set(cls.group_keys()))

    @classmethod
    def _unknown_key_error(cls, key: str, source: str) -> GaLoreConfigError:
        valid = cls.valid_keys()
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return GaLoreConfigError(f"unknown GaLore setting {key!r} in {source}.{hint} Valid keys: {', '.join(valid)}")

    @classmethod
    def parse_optim_args(cls, text: str | None) -> dict[str, Any]:
        """Parse ``"rank=64, update_proj_gap=200, proj_type=std"`` into typed values.

        Entries are separated by commas; list values (``target_modules``)
        separate their items with ``;``. Group keys without a field are
        parsed by the type of their default and returned under ``options``.
        Unknown keys and values that do not parse are errors naming the key
        and the accepted form.
        """
        hints = typing.get_type_hints(cls)
        fields = set(cls.field_names()) - {"options"}
        out: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for key, raw in split_optim_args(text):
            if key in fields:
                out[key] = parse_typed(key, raw, hints[key])
            elif key in cls.group_keys():
                options[key] = parse_text(key, raw, {**lowrank_defaults(), **ROUNDING_DEFAULTS}[key])
            else:
                raise cls._unknown_key_error(key, "`optim_args`")
        if options:
            out["options"] = options
        return out

    @classmethod
    def from_optim_args(cls, text: str | None, **overrides: Any) -> GaLoreConfig:
        """Build from an ``optim_args`` string plus keyword values (e.g. from ``optim_target_modules``).

        A key given both ways with different values is an error rather than a
        silent choice.
        """
        values = cls.parse_optim_args(text)
        for key, value in overrides.items():
            if key not in cls.field_names():
                raise cls._unknown_key_error(key, "the keyword arguments")
            if key in values:
                normalise = cls._FIELD_CHECKS.get(key, lambda _name, v: v)
                if normalise(key, values[key]) != normalise(key, value):
                    raise GaLoreConfigError(
                        f"`{key}` is set twice with different values: {values[key]!r} in `optim_args` and "
                        f"{value!r} elsewhere (e.g. `optim_target_modules` or the optim name); keep one"
                    )
            values[key] = value
        return cls(**values)

    # ------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GaLoreConfig:
        """Inverse of :meth:`to_dict`; unknown keys are errors listing the valid ones."""
        values: dict[str, Any] = {}
        options = dict(data.get("options") or {})
        for key, value in data.items():
            if key in cls.field_names():
                values[key] = value
            elif key in cls.group_keys():
                options[key] = value
            else:
                raise cls._unknown_key_error(key, "the config dict")
        values["options"] = options
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> GaLoreConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise GaLoreConfigError(f"a GaLoreConfig JSON document must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GaLoreConfig:
        with open(path, encoding="utf-8") as fh:
            return cls.from_json_string(fh.read())


__all__ = ["SMALL_WEIGHT_POLICIES", "GaLoreConfig"]
