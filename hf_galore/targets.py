"""Which weights are projected (``target_modules``) and the param groups that follow.

Matching rules (PEFT's, ``peft/tuners/tuners_utils.py``, and transformers'
``optim_target_modules``, ``trainer_utils.check_target_module_exists``):

* **list** — each entry is tried against the module names by these rules, in
  this order; the first rule that matches some module decides the entry:

  1. *exact name* — a module's full name equals the entry;
  2. *dot-bounded suffix* — a name ends with ``"." + entry`` (``"q_proj"``
     matches ``model.layers.0.self_attn.q_proj`` but not ``...self_q_proj``);
  3. *full-match regex* — ``re.fullmatch(entry, name)``, so transformers'
     ``[r".*.attn.*", r".*.mlp.*"]`` works;
  4. *substring* — the entry occurs in the name (transformers' rule, so the
     GaLore paper's ``["attn", "mlp"]`` works: ``attn`` is inside ``self_attn``).

  The start-up summary says which rule matched each entry. Every entry must
  match something: a typo is an error, not a silently smaller selection.
* **str** — a regex that must match the *whole* module name (``re.fullmatch``);
  a string equal to a module's full name counts as naming it (rule 1).
* ``"all-linear"`` — every ``nn.Linear`` (and transformers' GPT-2 style
  ``Conv1D``) except the output head (``model.get_output_embeddings()``).
* ``exclude_modules`` uses the same rules, is as strict (an entry that
  matches no module is an error) and always wins.

What a match selects: a module *named* (rules 1-2) gives its own weight if
it has a 2-D one, whatever its type (``["embed_tokens"]`` projects the
embedding). Everything else — a container (``mlp``, T5's ``SelfAttention``)
or a module found by a pattern (regex, substring) — gives only the linear
layers (``nn.Linear`` / ``Conv1D``) it is or holds, as transformers and PEFT
do, so an ``nn.Embedding`` such as T5's ``relative_attention_bias`` is never
projected by accident; the summary notes what was skipped.

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
import weakref
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


#: The rules a list entry is tried by, in order (transformers' and PEFT's, see the module docstring).
RULE_EXACT = "exact name"
RULE_SUFFIX = "dot-bounded suffix"
RULE_REGEX = "full-match regex"
RULE_SUBSTRING = "substring"
#: How a whole ``str`` spec matched.
RULE_REGEX_STRING = "full-match regex (a string)"
RULE_ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class EntryMatch:
    """How one ``target_modules`` / ``exclude_modules`` entry matched: the rule and the weights it gave."""

    field: str
    entry: str
    rule: str
    num_modules: int
    num_weights: int

    def describe(self) -> str:
        """One summary line, e.g. ``target_modules '.*.attn.*' matched as a full-match regex: 6 names, 4 weights``."""
        if self.rule == RULE_ALL_LINEAR:
            how = "means every linear layer but the output head"
        else:
            how = f"matched as {'an' if self.rule[0] in 'aeiou' else 'a'} {self.rule}"
        return f"{self.field} {self.entry!r} {how}: {self.num_modules} module names, {self.num_weights} weights"


@dataclass
class TargetSelection:
    """Result of :func:`select_target_modules`: module name → module, how each entry matched, notes."""

    modules: dict[str, nn.Module]
    notes: list[str] = field(default_factory=list)
    matches: list[EntryMatch] = field(default_factory=list)


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
        "Pass module names or dot-bounded suffixes (e.g. 'q_proj'), full-match regexes, substrings of module "
        "names, a full-match regex string, or 'all-linear'."
    )


def entry_roots(entry: str, names: Iterable[str]) -> tuple[str | None, list[str]]:
    """The rule that decides a list ``entry`` and the module names it matches (``(None, [])``: no match).

    Rules are tried in order — exact name, dot-bounded suffix, full-match
    regex, substring — and the first that matches any name wins, so
    ``"q_proj"`` never also picks ``q_proj_extra`` by substring. An entry
    that is no valid regex skips the regex rule.
    """
    names = list(names)
    exact = [n for n in names if n == entry]
    suffix = [n for n in names if n.endswith("." + entry)]
    if exact or suffix:
        return (RULE_EXACT if exact else RULE_SUFFIX), [n for n in names if n == entry or n.endswith("." + entry)]
    try:
        pattern = re.compile(entry)
    except re.error:
        pattern = None
    if pattern is not None:
        roots = [n for n in names if pattern.fullmatch(n)]
        if roots:
            return RULE_REGEX, roots
    roots = [n for n in names if entry in n]
    if roots:
        return RULE_SUBSTRING, roots
    return None, []


def _expand(roots: Iterable[str], modules: dict[str, nn.Module], *, named: bool, skipped: dict[str, None]) -> list[str]:
    """The modules whose weight a match selects, in model order.

    A root *named* by an exact name or suffix gives its own 2-D weight,
    whatever the module type; a root found by a pattern gives its weight
    only if it is a linear layer (others go to ``skipped``); a root without
    a 2-D weight (a container) gives the linear layers inside it.
    """
    out: dict[str, None] = {}
    for root in roots:
        module = modules[root]
        if _own_weight(module) is not None:
            if named or _is_linear(module):
                out[root] = None
            else:
                skipped[root] = None
            continue
        prefix = root + "."
        for name, inner in modules.items():
            if name.startswith(prefix) and _own_weight(inner) is not None:
                if _is_linear(inner):
                    out[name] = None
                else:
                    skipped[name] = None
    return [n for n in modules if n in out]


def _inside(roots: Iterable[str], modules: dict[str, nn.Module]) -> list[str]:
    """Every module with a 2-D weight that is a root or inside one (what an exclude entry removes)."""
    prefixes = tuple(r + "." for r in roots)
    roots = set(roots)
    return [n for n, m in modules.items() if _own_weight(m) is not None and (n in roots or n.startswith(prefixes))]


def _no_weight_error(field_name: str, entry: str, roots: list[str], skipped: list[str]) -> TargetModulesError:
    shown = f"{roots[:3]!r}{' …' if len(roots) > 3 else ''}"
    if skipped:
        return TargetModulesError(
            f"`{field_name}` entry {entry!r} matched {shown} but no linear layer (nn.Linear / Conv1D): patterns "
            f"and containers select linear layers only, and {skipped[:3]!r} are not. To project such a weight, "
            "name its module (full name or dot-bounded suffix, e.g. 'embed_tokens')"
        )
    return TargetModulesError(
        f"`{field_name}` entry {entry!r} matched {shown} but none of them holds a weight with 2 or more "
        "dimensions (only such weights can be projected)"
    )


def _match(
    spec: list[str] | str,
    model: nn.Module,
    modules: dict[str, nn.Module],
    field_name: str,
    selection: TargetSelection,
    *,
    exclude: bool = False,
) -> list[str]:
    """Module names ``spec`` selects (targets) or removes (``exclude=True``), recording how each entry matched."""
    names = list(modules)
    skipped: dict[str, None] = {}
    if spec == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [n for n, m in modules.items() if _is_linear(m) and m is not head and _own_weight(m) is not None]
        selection.matches.append(EntryMatch(field_name, spec, RULE_ALL_LINEAR, len(chosen), len(chosen)))
        return chosen
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise GaLoreConfigError(f"`{field_name}` {spec!r} is not a valid regex: {exc}") from None
        # A string that is a module's full name names it (transformers: "not a regex"); else it is a pattern.
        rule = RULE_EXACT if spec in modules else RULE_REGEX_STRING
        entries: list[tuple[str, str | None, list[str]]] = [(spec, rule, [n for n in names if pattern.fullmatch(n)])]
        how = "a string is a regex matched against the whole name"
    else:
        entries = [(entry, *entry_roots(entry, names)) for entry in spec]
        how = "tried as an exact name, a dot-bounded suffix, a full-match regex and a substring"
    selected: dict[str, None] = {}
    for entry, rule, roots in entries:
        if not roots:
            raise _no_match_error(field_name, entry, model, modules, how)
        if exclude:
            expanded = _inside(roots, modules)
        else:
            entry_skipped: dict[str, None] = {}
            expanded = _expand(roots, modules, named=rule in (RULE_EXACT, RULE_SUFFIX), skipped=entry_skipped)
            if not expanded:
                raise _no_weight_error(field_name, entry, roots, list(entry_skipped))
            skipped.update(entry_skipped)
        selection.matches.append(EntryMatch(field_name, entry, rule, len(roots), len(expanded)))
        selected.update(dict.fromkeys(expanded))
    chosen = [n for n in names if n in selected]  # model order, whatever the entry order
    skipped_names = [n for n in skipped if n not in selected]
    if skipped_names:
        kinds = sorted({type(modules[n]).__name__ for n in skipped_names})
        selection.notes.append(
            f"`{field_name}` matched {len(skipped_names)} modules with a 2-D weight that are not linear layers "
            f"({', '.join(kinds)}; e.g. {skipped_names[0]}); they train at full rank. Name such a module exactly "
            "to project it"
        )
    return chosen


def select_target_modules(
    model: nn.Module,
    target_modules: list[str] | str | None,
    exclude_modules: list[str] | str | None = None,
) -> TargetSelection:
    """Modules whose ``weight`` will be projected, in ``model.named_modules()`` order.

    Raises :class:`TargetModulesError` when a target or exclude entry matches
    nothing (with the closest module names) and :class:`GaLoreConfigError`
    for weights that cannot be projected (sparse, non-floating).
    """
    if target_modules is None:
        raise GaLoreConfigError(
            "`target_modules` is not set: say which modules GaLore projects, e.g. ['attn', 'mlp'] "
            "(Trainer: `optim_target_modules`), a regex string, or 'all-linear'"
        )
    modules = {name: module for name, module in model.named_modules() if name}
    selection = TargetSelection({})
    chosen = _match(target_modules, model, modules, "target_modules", selection)
    if exclude_modules is not None:
        excluded = set(_match(exclude_modules, model, modules, "exclude_modules", selection, exclude=True))
        if not excluded & set(chosen):
            warnings.warn(
                f"`exclude_modules`={exclude_modules!r} removed none of the modules `target_modules` selected",
                UserWarning,
                stacklevel=2,
            )
        chosen = [n for n in chosen if n not in excluded]
    _refuse_adapter_factors(target_modules, chosen, modules)
    if not chosen:
        raise TargetModulesError(
            f"`target_modules`={target_modules!r} with `exclude_modules`={exclude_modules!r} leaves no module "
            f"with a 2-D weight in {type(model).__name__}"
        )
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
        selection.modules[name] = module
    if frozen:
        selection.notes.append(f"{len(frozen)} matched modules have frozen weights and are skipped: {frozen[:3]!r}")
    if not selection.modules:
        raise TargetModulesError(
            f"every module matched by `target_modules`={target_modules!r} has a frozen weight "
            "(requires_grad=False); nothing would be trained with GaLore"
        )
    return selection


def _adapter_factors(chosen: list[str], modules: dict[str, nn.Module]) -> list[str]:
    """The chosen modules that are a PEFT adapter's weights (LoRA's ``lora_A`` / ``lora_B``, ...)."""
    if "peft" not in sys.modules:  # a PEFT model cannot exist without peft imported
        return []
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    found = []
    for name in chosen:
        parts = name.split(".")
        for i in range(1, len(parts)):
            layer = modules.get(".".join(parts[:i]))
            if isinstance(layer, BaseTunerLayer) and parts[i] in getattr(layer, "adapter_layer_names", ()):
                found.append(name)
                break
    return found


def _refuse_adapter_factors(target_modules: Any, chosen: list[str], modules: dict[str, nn.Module]) -> None:
    """GaLore on a LoRA model would project the adapter's factors, already low-rank: say so instead."""
    factors = _adapter_factors(chosen, modules)
    if not factors:
        return
    example = factors[0]
    shape = tuple(modules[example].weight.shape)
    raise GaLoreConfigError(
        f"`target_modules`={target_modules!r} selects {len(factors)} weights of PEFT adapters, e.g. {example} "
        f"{shape}: LoRA factors, already low-rank, which GaLore would project again while the frozen base weights "
        "stay as they are. GaLore trains the full weights instead of an adapter: build the Trainer on the base "
        "model (without `get_peft_model`) for full-parameter training at LoRA-like memory, or train this PEFT "
        "model with a plain optimizer (optim='adamw_torch')"
    )


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

    ``lowrank``: (parameter name, shape) of projected weights (may be empty
    when ``rank`` is at or above every matched weight's smaller side);
    ``small``: matched weights trained at full rank because their smaller
    dimension is <= rank; ``notes``: matching remarks for the summary;
    ``matches``: which rule matched each target / exclude entry.
    """

    groups: list[dict[str, Any]]
    rank: int
    lowrank: list[tuple[str, tuple[int, ...]]]
    small: list[tuple[str, tuple[int, ...]]]
    notes: list[str]
    num_full_rank: int
    matches: list[EntryMatch] = field(default_factory=list)


#: model → the (rank, small weight names) already warned about: one warning per model and setting, although
#: the Trainer plans twice (the check at ``Trainer(...)`` and the optimizer build).
_WARNED_SMALL: weakref.WeakKeyDictionary[nn.Module, set[tuple]] = weakref.WeakKeyDictionary()


def _warn_small(model: nn.Module, rank: int, small: list, projected: int) -> None:
    key = (rank, tuple(n for n, _ in small))
    try:
        seen = _WARNED_SMALL.setdefault(model, set())
    except TypeError:  # not weak-referenceable: warn every time rather than never
        seen = set()
    if key in seen:
        return
    seen.add(key)
    largest = max(_min_dim(torch.Size(s)) for _, s in small)
    if projected == 0:
        message = (
            f"GaLore: `rank`={rank} is >= the smaller dimension of every one of the {len(small)} matched weights "
            f"(the largest is {largest}), so 0 weights are projected: they train at full rank with the base "
            f"optimizer, saving no memory. Lower `rank` below {largest} (e.g. optim_args='rank={max(1, largest // 2)}') "
            "to project them, or set `small_weights='error'` to refuse"
        )
    else:
        message = (
            f"GaLore: {len(small)} matched weights have a smaller dimension <= `rank`={rank} and are trained at "
            f"full rank (projection would save nothing), e.g. {small[0][0]} {small[0][1]}; {projected} weights "
            "are projected. Set `small_weights='error'` to refuse instead"
        )
    warnings.warn(message, UserWarning, stacklevel=3)


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
            f"`rank`={config.rank} is >= the smaller dimension of {len(small)} matched weights"
            + (" (all of them)" if not lowrank else "")
            + ", e.g. "
            + ", ".join(f"{n} {s}" for n, s in small[:5])
            + ". Lower `rank`, exclude them via `exclude_modules`, or set `small_weights='full_rank'` "
            "to train them at full rank"
        )
    if small:
        _warn_small(model, config.rank, small, len(lowrank))
    groups = []
    options = config.group_options()
    rounding = config.rounding_options()
    for (is_target, decays), params in buckets.items():
        if not params:
            continue
        group: dict[str, Any] = {"params": params}
        group.update(options if is_target else rounding)
        if not is_target and not options["skip_nonfinite"]:  # the guard is a setting of every group
            group["skip_nonfinite"] = False
        if not decays:
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return GaLorePlan(groups, config.rank, lowrank, small, selection.notes, num_full, selection.matches)


def galore_param_groups(
    model: nn.Module, config: GaLoreConfig, *, weight_decay: float | None = None
) -> list[dict[str, Any]]:
    """Param groups for any hf_galore optimizer: projected weights in groups with ``rank``.

    ``GaLoreAdamW(galore_param_groups(model, GaLoreConfig(rank=64, target_modules=["attn", "mlp"])), lr=1e-3)``
    """
    return plan_param_groups(model, config, weight_decay=weight_decay).groups


__all__ = [
    "EntryMatch",
    "GaLorePlan",
    "TargetModulesError",
    "TargetSelection",
    "decay_parameter_names",
    "entry_roots",
    "galore_param_groups",
    "plan_param_groups",
    "select_target_modules",
]
