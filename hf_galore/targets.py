"""Which weights are projected (``target_modules``) and the param groups that follow.

Matching rules (PEFT's, ``peft/tuners/tuners_utils.py``, plus two additions):

* **list** — each entry matches a module whose full name equals it or ends
  with ``"." + entry`` (dot-bounded suffix: ``"q_proj"`` matches
  ``model.layers.0.self_attn.q_proj`` but not ``...self_q_proj``).
  *Addition 1*: a matched module without a 2-D weight of its own (a
  container such as ``mlp``) selects every module with a 2-D weight inside it.
  *Addition 2*: an entry that is no dot-bounded suffix of any module name is
  matched as a substring, the rule of transformers' ``optim_target_modules``,
  so the GaLore paper's ``["attn", "mlp"]`` keeps working (``attn`` is inside
  ``self_attn``); the start-up summary notes each entry matched that way.
  Every entry must match something: a typo is an error, not a silently
  smaller selection.
* **str** — a regex that must match the *whole* module name
  (``re.fullmatch``); containers expand as above.
* ``"all-linear"`` — every ``nn.Linear`` (and transformers' GPT-2 style
  ``Conv1D``) except the output head (``model.get_output_embeddings()``).
* ``exclude_modules`` uses the same rules and always wins.

Only 2-D (or higher, viewed as ``(shape[0], prod(shape[1:]))``) floating-point
dense weights that require gradients can be projected; everything else
(embeddings unless named, norms, biases, the head) trains at full rank with the
same base optimizer. Weight decay follows the Trainer's rule (none on biases
and norm weights).
"""

from __future__ import annotations

import difflib
import math
import re
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import GaLoreConfigError

if TYPE_CHECKING:
    from .config import GaLoreConfig

#: transformers' rule for parameters without weight decay (``Trainer.get_decay_parameter_names``).
NO_DECAY_NAME_PATTERNS = (
    r"bias",
    r"layernorm",
    r"rmsnorm",
    r"(?:^|\.)norm(?:$|\.)",
    r"_norm(?:$|\.)",
)


class TargetModulesError(GaLoreConfigError):
    """``target_modules`` / ``exclude_modules`` selected nothing usable."""


@dataclass
class TargetSelection:
    """Result of :func:`select_target_modules`: module name → module, plus notes for the summary."""

    modules: dict[str, nn.Module]
    notes: list[str] = field(default_factory=list)


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def _own_weight(module: nn.Module) -> torch.Tensor | None:
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return weight if weight is not None and weight.dim() >= 2 else None


def _closest(entry: str, modules: dict[str, nn.Module]) -> list[str]:
    """Module names (or dot-bounded suffixes) nearest to ``entry``; else example names of 2-D weights."""
    names = list(modules)
    candidates = set(names)
    for name in names:
        parts = name.split(".")
        candidates.update(".".join(parts[i:]) for i in range(1, len(parts)))
    close = difflib.get_close_matches(entry, sorted(candidates), n=5, cutoff=0.5)
    if close:
        return close
    weighted = [n for n, m in modules.items() if _own_weight(m) is not None]
    return sorted({n.rsplit(".", 1)[-1] for n in weighted})[:8] + weighted[:2]


def _no_match_error(
    field_name: str,
    entry: str,
    model: nn.Module,
    modules: dict[str, nn.Module],
    how: str,
) -> TargetModulesError:
    close = _closest(entry, modules)
    return TargetModulesError(
        f"`{field_name}` entry {entry!r} matched no module of {type(model).__name__} ({how}). "
        f"Closest module names: {', '.join(repr(c) for c in close)}. "
        "Pass module names or dot-bounded suffixes (e.g. 'q_proj'), a full-match regex string, or 'all-linear'."
    )


def _expand(roots: Iterable[str], modules: dict[str, nn.Module]) -> list[str]:
    """Matched modules with a 2-D weight, or the modules with one inside a matched container."""
    out: dict[str, None] = {}
    for root in roots:
        if _own_weight(modules[root]) is not None:
            out[root] = None
            continue
        prefix = root + "."
        for name, module in modules.items():
            if name.startswith(prefix) and _own_weight(module) is not None:
                out[name] = None
    return list(out)


def _match(
    spec: list[str] | str,
    model: nn.Module,
    modules: dict[str, nn.Module],
    field_name: str,
    notes: list[str],
    *,
    strict: bool,
) -> list[str]:
    names = list(modules)
    if spec == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [n for n, m in modules.items() if _is_linear(m) and m is not head and _own_weight(m) is not None]
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise GaLoreConfigError(f"`{field_name}` {spec!r} is not a valid regex: {exc}") from None
        roots = [n for n in names if pattern.fullmatch(n)]
        if not roots and strict:
            raise _no_match_error(
                field_name,
                spec,
                model,
                modules,
                "a string is a regex matched against the whole name",
            )
        return _expand(roots, modules)
    selected: dict[str, None] = {}
    for entry in spec:
        roots = [n for n in names if n == entry or n.endswith("." + entry)]
        if not roots:
            roots = [n for n in names if entry in n]
            if roots:
                notes.append(
                    f"`{field_name}` entry {entry!r} is no module name or suffix; matched as a substring "
                    f"(transformers' `optim_target_modules` rule) in {len(roots)} module names"
                )
        if not roots:
            if strict:
                raise _no_match_error(
                    field_name,
                    entry,
                    model,
                    modules,
                    "names match in full or as a dot-bounded suffix",
                )
            notes.append(f"`{field_name}` entry {entry!r} matched no module")
            continue
        expanded = _expand(roots, modules)
        if not expanded and strict:
            raise TargetModulesError(
                f"`{field_name}` entry {entry!r} matched {roots[:3]!r}"
                f"{' …' if len(roots) > 3 else ''} but none of them holds a weight with 2 or more dimensions "
                "(only such weights can be projected)"
            )
        selected.update(dict.fromkeys(expanded))
    return [n for n in names if n in selected]  # model order, whatever the entry order


def select_target_modules(
    model: nn.Module,
    target_modules: list[str] | str | None,
    exclude_modules: list[str] | str | None = None,
) -> TargetSelection:
    """Modules whose ``weight`` will be projected, in ``model.named_modules()`` order.

    Raises :class:`TargetModulesError` when a pattern matches nothing (with
    the closest module names) and :class:`GaLoreConfigError` for weights that
    cannot be projected (sparse, non-floating).
    """
    if target_modules is None:
        raise GaLoreConfigError(
            "`target_modules` is not set: say which modules GaLore projects, e.g. ['attn', 'mlp'] "
            "(Trainer: `optim_target_modules`), a regex string, or 'all-linear'"
        )
    modules = {name: module for name, module in model.named_modules() if name}
    notes: list[str] = []
    chosen = _match(target_modules, model, modules, "target_modules", notes, strict=True)
    if exclude_modules is not None:
        excluded = set(_match(exclude_modules, model, modules, "exclude_modules", notes, strict=False))
        if not excluded:
            warnings.warn(
                f"`exclude_modules`={exclude_modules!r} excluded no module",
                UserWarning,
                stacklevel=2,
            )
        chosen = [n for n in chosen if n not in excluded]
    if not chosen:
        raise TargetModulesError(
            f"`target_modules`={target_modules!r} with `exclude_modules`={exclude_modules!r} leaves no module "
            f"with a 2-D weight in {type(model).__name__}"
        )
    selected: dict[str, nn.Module] = {}
    frozen = []
    for name in chosen:
        module = modules[name]
        weight = module.weight
        if isinstance(module, nn.Embedding) and module.sparse or weight.is_sparse:
            raise GaLoreConfigError(
                f"`{name}` produces sparse gradients (nn.Embedding(sparse=True)); GaLore projects dense "
                "gradients: build it with `sparse=False` or exclude it via `exclude_modules`"
            )
        if not weight.is_floating_point():
            raise GaLoreConfigError(
                f"`{name}.weight` has dtype {weight.dtype}; only floating-point weights can be projected "
                "(a quantized layer?). Exclude it via `exclude_modules` or target floating-point modules"
            )
        if not weight.requires_grad:
            frozen.append(name)
            continue
        selected[name] = module
    if frozen:
        notes.append(f"{len(frozen)} matched modules have frozen weights and are skipped: {frozen[:3]!r}")
    if not selected:
        raise TargetModulesError(
            f"every module matched by `target_modules`={target_modules!r} has a frozen weight "
            "(requires_grad=False); nothing would be trained with GaLore"
        )
    return TargetSelection(selected, notes)


# ---------------------------------------------------------------- decay rule
def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that get weight decay, by the Trainer's rule.

    Uses ``transformers.trainer_pt_utils.get_parameter_names`` when it is
    importable (LayerNorm params and names matching ``bias``/``norm``
    excluded); the same rule is applied by hand otherwise.
    """
    try:
        from transformers.trainer_pt_utils import get_parameter_names
    except ImportError:  # pragma: no cover - transformers is a dependency
        get_parameter_names = None
    if get_parameter_names is not None:
        try:
            return set(get_parameter_names(model, [nn.LayerNorm], list(NO_DECAY_NAME_PATTERNS)))
        except TypeError:  # transformers < 4.48: no name patterns argument
            names = get_parameter_names(model, [nn.LayerNorm])
            return {n for n in names if not any(re.search(p, n.lower()) for p in NO_DECAY_NAME_PATTERNS)}
    out = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.LayerNorm) or any(re.search(p, full.lower()) for p in NO_DECAY_NAME_PATTERNS):
                continue
            out.add(full)
    return out


# ---------------------------------------------------------------- the plan
@dataclass
class GaLorePlan:
    """What :func:`plan_param_groups` decided: the groups and, per weight, why.

    ``lowrank``: (parameter name, shape) of projected weights;
    ``small``: matched weights trained at full rank because their smaller
    dimension is <= rank; ``notes``: matching remarks for the summary.
    """

    groups: list[dict[str, Any]]
    rank: int
    lowrank: list[tuple[str, tuple[int, ...]]]
    small: list[tuple[str, tuple[int, ...]]]
    notes: list[str]
    num_full_rank: int


def _min_dim(shape: torch.Size) -> int:
    return min(shape[0], math.prod(shape[1:]))


def plan_param_groups(model: nn.Module, config: GaLoreConfig, *, weight_decay: float | None = None) -> GaLorePlan:
    """Split ``model``'s trainable parameters into low-rank and full-rank, decay and no-decay groups.

    Low-rank groups carry ``config.group_options()`` (``rank``, ...), full-rank
    groups ``config.rounding_options()`` (``stochastic_rounding``). Decay
    groups get ``weight_decay`` when it is given (else the optimizer's
    default applies); no-decay groups get ``weight_decay=0.0``.
    """
    selection = select_target_modules(model, config.target_modules, config.exclude_modules)
    target_weights = {id(m.weight): name + ".weight" for name, m in selection.modules.items()}
    decay = decay_parameter_names(model)
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {
        (True, True): [],
        (True, False): [],
        (False, True): [],
        (False, False): [],
    }
    lowrank, small = [], []
    num_full = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_target = id(param) in target_weights
        if is_target and config.rank >= _min_dim(param.shape):
            small.append((name, tuple(param.shape)))
            is_target = False
        if is_target:
            lowrank.append((name, tuple(param.shape)))
        else:
            num_full += 1
        buckets[(is_target, name in decay)].append(param)
    if small and config.small_weights == "error":
        raise GaLoreConfigError(
            f"`rank`={config.rank} is >= the smaller dimension of {len(small)} matched weights, e.g. "
            + ", ".join(f"{n} {s}" for n, s in small[:5])
            + ". Lower `rank`, exclude them via `exclude_modules`, or set `small_weights='full_rank'` "
            "to train them at full rank"
        )
    if not lowrank:
        raise GaLoreConfigError(
            f"`rank`={config.rank} is >= the smaller dimension of every matched weight "
            f"({', '.join(f'{n} {s}' for n, s in small[:5])}); nothing would be projected. Lower `rank`"
        )
    if small:
        warnings.warn(
            f"GaLore: {len(small)} matched weights have a smaller dimension <= `rank`={config.rank} and are "
            f"trained at full rank (projection would save nothing), e.g. {small[0][0]} {small[0][1]}",
            UserWarning,
            stacklevel=2,
        )
    groups = []
    options = config.group_options()
    rounding = config.rounding_options()
    for (is_target, decays), params in buckets.items():
        if not params:
            continue
        group: dict[str, Any] = {"params": params}
        group.update(options if is_target else rounding)
        if not decays:
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return GaLorePlan(groups, config.rank, lowrank, small, selection.notes, num_full)


def galore_param_groups(
    model: nn.Module, config: GaLoreConfig, *, weight_decay: float | None = None
) -> list[dict[str, Any]]:
    """Param groups for any hf_galore optimizer: projected weights in groups with ``rank``.

    ``GaLoreAdamW(galore_param_groups(model, GaLoreConfig(rank=64, target_modules=["attn", "mlp"])), lr=1e-3)``
    """
    return plan_param_groups(model, config, weight_decay=weight_decay).groups


__all__ = [
    "GaLorePlan",
    "TargetModulesError",
    "TargetSelection",
    "decay_parameter_names",
    "galore_param_groups",
    "plan_param_groups",
    "select_target_modules",
]
