"""Does a weight's optimizer state fit its param group? Checked before every low-rank update and on load.

The update kernels trust the state: ``torch._fused_adamw_`` walks the moments'
raw memory with the gradient's sizes, so a ``(32, 4)`` moment used for a
``(32, 8)`` gradient corrupts the heap (the process aborts) and a ``(32, 2)``
one is read silently wrong. Here the shapes are compared, and nothing else
(no values, so no device sync), with what the group's ``rank``, ``proj_type``
and ``quant`` and the member's moment layout (``_moment_shapes``) require:

* before a low-rank update a mismatch means the group was changed during
  training (a ``rank`` / ``proj_type`` schedule): the weight's state is re-made;
* in ``load_state_dict`` it means the checkpoint does not belong to this
  optimizer (other settings, model, parameter order or optimizer, or a foreign
  ``state_dict``): :class:`~hf_galore.errors.StateMismatchError` names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import GaLoreConfigError, StateMismatchError
from ..numerics import all_finite
from ..projectors.geometry import effective_rank, matrix_shape, sides_for
from ..projectors.storage import get_codec
from .engines import engine_for
from .lowrank import basis_key
from .validation import lowrank_defaults

if TYPE_CHECKING:
    from ..declare import StateTensor
    from .base import GaLoreOptimizer

#: ``(state key, expected shape or None for "absent", found shape or None for "missing")``
Mismatch = tuple[str, Any, Any]

_SIDES = ("left", "right")  # basis_key(side) for each


def _shape_of(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(shape)


def find_mismatch(
    optimizer: GaLoreOptimizer,
    param: torch.Tensor,
    state: dict,
    group: dict,
    layout: dict[str, StateTensor] | None = None,
) -> Mismatch | None:
    """The first state entry of ``param`` whose shape does not fit ``group``, or ``None``.

    Bases must be ``(k, r)`` for the sides ``proj_type`` picks (and absent for
    the other side); moments must have the shapes the member declares for the
    low-rank gradient (or the weight, in a full-rank group). A layout that is
    only partly present (e.g. ``exp_avg`` without ``exp_avg_sq``) is a mismatch
    too. Missing state is not: it is created at the next step. ``layout`` is
    the member's ``state_layout`` for ``moment_like(param, group)`` when the
    caller has it (shapes do not depend on its dtype); else it is computed.
    """
    if "rank" in group:
        shape = param.shape
        if len(shape) < 2:
            return ("param", ">= 2 dimensions", tuple(shape))
        m, n = shape if len(shape) == 2 else matrix_shape(shape)
        sides = sides_for(group["proj_type"], (m, n))
        rank = effective_rank(group["rank"], (m, n))
        codec = get_codec(group["quant"])
        for side, key, size in (("left", "basis_left", m), ("right", "basis_right", n)):
            found = codec.stored_shape(state, key)
            if found is not None:
                expected = (size, rank) if side in sides else None
                if found != expected:
                    return (key, expected, tuple(found))
    if layout is None:
        expected = optimizer._moment_shapes(moment_like(param, group), group, state)
    else:
        expected = {key: entry.shape for key, entry in layout.items()}
    return _moments_mismatch(expected, state)


def moment_like(param: torch.Tensor, group: dict) -> tuple[int, ...]:
    """Shape of the gradient the base update sees: ``R`` in a low-rank group, the weight's own otherwise."""
    if "rank" not in group or param.dim() < 2:
        return tuple(param.shape)
    m, n = matrix_shape(param.shape)
    sides = sides_for(group["proj_type"], (m, n))
    rank = effective_rank(group["rank"], (m, n))
    return (rank if "left" in sides else m, rank if "right" in sides else n)


def conform_dtypes(state: dict, layout: dict[str, StateTensor]) -> list[tuple[str, torch.dtype]]:
    """Cast float state entries to the dtype ``layout`` gives them; ``(key, old dtype)`` of each cast.

    ``layout`` is the member's ``state_layout`` for the gradient's dtype: it
    says which entries follow the gradient (declared without a dtype) and
    which keep theirs (8-bit codes, float32 statistics). Shapes are assumed to
    fit (checked first, :func:`find_mismatch`).
    """
    cast = []
    for key, entry in layout.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or value.dtype == entry.dtype:
            continue
        if _is_float(value.dtype) and _is_float(entry.dtype):
            cast.append((key, value.dtype))
            state[key] = value.to(entry.dtype)
    return cast


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _moments_mismatch(expected_moments: dict[str, tuple[int, ...]], state: dict) -> Mismatch | None:
    missing = None
    for key, expected in expected_moments.items():
        value = state.get(key)
        if value is None:
            missing = missing or key
            continue
        found = getattr(value, "shape", None)  # torch.Size compares equal to a tuple
        if found != expected:
            return (key, expected, None if found is None else tuple(found))
    if missing is not None and any(key in state for key in expected_moments):
        return (missing, expected_moments[missing], None)
    return None


def describe(mismatch: Mismatch, group: dict) -> str:
    """``state key `exp_avg` should have shape (48, 4) for `rank`=4, `proj_type`='std' but has (48, 8)``."""
    key, expected, found = mismatch
    if "rank" in group:
        settings = f"`rank`={group['rank']!r}, `proj_type`={group['proj_type']!r}"
        if group.get("quant") is not None:
            settings += f", `quant`={group['quant']!r}"
    else:
        settings = "a full-rank group"
    if key == "param":
        return (
            f"a weight of shape {found} cannot be in a low-rank group (`rank`={group['rank']!r}): it needs {expected}"
        )
    if expected is None:
        return f"state key `{key}` should be absent for {settings} but has shape {found}"
    if found is None:
        return f"state key `{key}` (shape {expected} for {settings}) is missing"
    return f"state key `{key}` should have shape {expected} for {settings} but has {found}"


def _param_label(group: dict, position: int, param: torch.Tensor) -> str:
    names = group.get("param_names")
    name = f" {names[position]!r}" if names and position < len(names) else ""
    return f"param {position}{name} (shape {tuple(param.shape)})"


def _member_keys(cls: type) -> frozenset[str]:
    return frozenset(getattr(cls, "state_keys", {}))


def _foreign_keys(optimizer: GaLoreOptimizer, state: dict) -> list[str]:
    """Moment keys other GaLore members use that this one never does (another optimizer's state)."""
    # the family's root (``GaLoreOptimizer``, which declares ``_moment_shapes``), found without importing
    # ``base`` (it imports this module)
    root = next(c for c in reversed(type(optimizer).__mro__) if "_moment_shapes" in c.__dict__)
    known: set[str] = set()
    stack = [root]
    while stack:
        cls = stack.pop()
        known |= _member_keys(cls)
        stack.extend(cls.__subclasses__())
    return sorted(key for key in state if key in known - _member_keys(type(optimizer)))


_START_FRESH = (
    "Load it into an optimizer built the same way as the one that saved it, or start this optimizer "
    "fresh: skip its load_state_dict (with the Trainer, remove `optimizer.pt` from the checkpoint folder "
    "before resuming); the model weights load independently"
)


def check_loadable(optimizer: GaLoreOptimizer, state_dict: dict) -> None:
    """Refuse, before anything is changed, a ``state_dict`` whose state would not fit after loading.

    Mismatched group or parameter counts are left to ``torch.optim.Optimizer``'s own message.
    """
    name = type(optimizer).__name__
    states = state_dict.get("state", {})
    for pid, state in states.items():
        if isinstance(state, dict) and "projector" in state:
            raise StateMismatchError(
                f"the state of parameter {pid} holds a `projector` object (and an int `step`): this state_dict "
                f"was saved by galore-torch, whose projector objects {name} cannot read (hf_galore keeps each "
                "basis as plain tensors, `basis_left` / `basis_right`). " + _START_FRESH + "; the first step "
                "then computes a new basis."
            )
    live_groups, saved_groups = optimizer.param_groups, state_dict.get("param_groups", [])
    if len(live_groups) != len(saved_groups) or any(
        len(live["params"]) != len(saved["params"]) for live, saved in zip(live_groups, saved_groups)
    ):
        return
    for index, (live, saved) in enumerate(zip(live_groups, saved_groups)):
        _check_galore_settings(optimizer, index, live, saved)
        missing = [key for key in optimizer._group_identity if key not in saved]
        if missing:
            raise StateMismatchError(
                f"param group {index} of the state_dict has no {', '.join(f'`{k}`' for k in missing)}, which "
                f"every {name} group has: the state_dict was saved by a different optimizer (resuming "
                f"`galore_adamw` with `galore_adafactor`, or the reverse?). " + _START_FRESH + "."
            )
        group = {**optimizer.defaults, **saved}  # the settings after loading (load_state_dict fills defaults)
        if "rank" in saved:
            group = {**lowrank_defaults(), **group}
        if "rank" in live and "rank" not in saved:
            detail = ""
            for position, (param, pid) in enumerate(zip(live["params"], saved["params"])):
                found = states.get(pid, {}).get("exp_avg")
                if found is not None:
                    detail = (
                        f"; the saved `exp_avg` of {_param_label(live, position, param)} is full-size, "
                        f"{_shape_of(found)}, not a rank-{live['rank']} moment"
                    )
                    break
            raise StateMismatchError(
                f"param group {index} is low-rank here (`rank`={live['rank']!r}) but the state_dict's group "
                f"{index} has no `rank`: it was saved by a full-rank optimizer (e.g. torch.optim.AdamW){detail}. "
                "Full-size moments cannot be used as low-rank ones. " + _START_FRESH + "."
            )
        for position, (param, pid) in enumerate(zip(live["params"], saved["params"])):
            state = states.get(pid)
            if "rank" in group and param.dim() < 2:  # with or without saved state
                _refuse(index, live, position, param, ("param", ">= 2 dimensions", tuple(param.shape)), group)
            if not state:
                continue
            if engine_for(param) is None:
                shards = sorted(k for k, v in state.items() if _is_dtensor(v))
                if shards:
                    raise StateMismatchError(
                        f"param group {index}, {_param_label(live, position, param)}: state keys "
                        f"{', '.join(f'`{k}`' for k in shards)} are FSDP2 shards (DTensor), saved by a sharded "
                        f"run, but {name} here is not sharded. Load it under fully_shard with the same mesh, or "
                        "save a full state dict from that run (torch.distributed.checkpoint.state_dict."
                        "get_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True)))"
                    )
            foreign = _foreign_keys(optimizer, state)
            if foreign:
                raise StateMismatchError(
                    f"param group {index}, {_param_label(live, position, param)}: state keys "
                    f"{', '.join(f'`{k}`' for k in foreign)} belong to another GaLore optimizer, not {name}: "
                    "the state_dict was saved by a different optimizer. " + _START_FRESH + "."
                )
            if engine_for(param) is not None:  # shard shapes: checked by the engine's load hook
                continue
            mismatch = find_mismatch(optimizer, param, state, group)
            if mismatch is None and "rank" in group:
                codec = get_codec(group["quant"])
                mismatch = next(
                    (p for p in (codec.layout_problem(state, basis_key(s)) for s in _SIDES) if p is not None), None
                )
            if mismatch is not None:
                _refuse(index, live, position, param, mismatch, group, optimizer._mismatch_hint(*mismatch))


#: Group keys that decide the state's shapes: a checkpoint saved with other values cannot continue unnoticed
LAYOUT_KEYS = ("rank", "proj_type", "quant")


def _check_galore_settings(optimizer: GaLoreOptimizer, index: int, live: dict, saved: dict) -> None:
    """Refuse a checkpoint whose layout keys differ from the group's; warn for other GaLore keys that differ.

    ``torch.optim.Optimizer.load_state_dict`` restores the saved groups'
    values, so resuming a Trainer run with another ``optim_args`` rank kept
    the old rank and said nothing. The GaLore keys both groups hold are
    compared: ``rank``, ``proj_type`` and ``quant`` must match (the state's
    shapes depend on them); any other GaLore key that differs takes the
    checkpoint's value, as torch.optim does for ``lr``, with one warning.
    """
    if "rank" not in live or "rank" not in saved:
        return
    galore_keys = ("rank", *lowrank_defaults())
    differ = [k for k in galore_keys if k in live and k in saved and not _same(live[k], saved[k])]
    layout = [k for k in differ if k in LAYOUT_KEYS]
    if layout:
        shown = ", ".join(f"`{k}`={saved[k]!r} in the checkpoint, {live[k]!r} here" for k in layout)
        raise GaLoreConfigError(
            f"param group {index} was saved with other settings than this optimizer has ({shown}); the saved "
            "state cannot continue under them. Resume with the checkpoint's settings, or to change them "
            f"mid-run, load into an optimizer built with those and then set e.g. "
            f"`optimizer.param_groups[{index}][{layout[0]!r}] = {live[layout[0]]!r}`: each weight's state is "
            "re-made at the next step (docs/optimizers.md, 'Changing rank or proj_type during training')"
        )
    if differ:
        shown = ", ".join(f"`{k}`={saved[k]!r} (built with {live[k]!r})" for k in differ)
        optimizer.galore_stats.warn_once(
            "loaded_settings",
            f"GaLore: param group {index} takes the checkpoint's {shown}, as torch.optim restores a saved "
            "group's hyper-parameters; set them on `optimizer.param_groups` after loading to change them",
        )


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, ValueError, TypeError):  # tensors of several values
        return a is b


def _is_dtensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value) is not torch.Tensor and hasattr(value, "to_local")


_OTHER_SETTINGS = ". The checkpoint was saved with other group settings, another model or another parameter order"


def _refuse(
    index: int, live: dict, position: int, param: torch.Tensor, mismatch: Mismatch, group: dict, cause: str = ""
) -> None:
    """Raise the error for ``mismatch``; ``cause`` (the member's reading of it) replaces the generic one."""
    raise StateMismatchError(
        f"the state_dict does not fit param group {index}, {_param_label(live, position, param)}: "
        f"{describe(mismatch, group)}{cause or _OTHER_SETTINGS}. " + _START_FRESH + "."
    )


def reset_nonfinite_moments(optimizer: GaLoreOptimizer) -> int:
    """Clear the base update's state of every weight whose loaded moments hold NaN/Inf; returns how many.

    Such moments would turn the weight NaN at its first step, and every step
    after that would be skipped for a "NaN gradient". The weight starts again
    as a new one (its moments and ``step``; its basis is checked separately).
    One host sync per loaded floating-point moment, once per ``load_state_dict``.
    """
    keys = tuple(type(optimizer).state_keys)
    reset = 0
    for state in optimizer.state.values():
        moments = [state[k] for k in keys if isinstance(state.get(k), torch.Tensor) and _is_float(state[k].dtype)]
        if all(all_finite(torch.view_as_real(m) if m.is_complex() else m) for m in moments):
            continue
        for key in keys:
            state.pop(key, None)
        if isinstance(state.get("step"), torch.Tensor):
            state["step"].zero_()
        reset += 1
    return reset


def drop_nonfinite_bases(optimizer: GaLoreOptimizer) -> int:
    """Drop every loaded basis holding NaN/Inf (the next step computes a new one); returns how many.

    A non-finite basis would turn the weight NaN at its next update; the
    moments are kept. Runs once per ``load_state_dict`` (one host sync per basis).
    """
    dropped = 0
    for group in optimizer.param_groups:
        if "rank" not in group:
            continue
        codec = get_codec(group["quant"])
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            for side in _SIDES:
                basis = codec.decode(state, basis_key(side))
                if isinstance(basis, torch.Tensor) and not all_finite(basis):
                    codec.drop(state, basis_key(side))
                    dropped += 1
    return dropped
