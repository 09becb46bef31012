"""The one place that finds the basis, projects a gradient and projects an update back.

Every GaLore-family optimizer calls :func:`project_gradient` before its base
update and :func:`apply_update` after it; the projector (``projector``),
basis storage (``quant``) and refresh schedule (``refresh``) are looked up
from the param group, so members never branch on names here.

Per-weight state keys written here: ``basis_left`` / ``basis_right`` (or
the quantized codec's keys derived from them).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..numerics import all_finite
from ..projectors import get_projector
from ..projectors.geometry import (
    add_to_matrix_,
    as_matrix,
    effective_rank,
    matrix_shape,
    project,
    project_back_add_,
    side_size,
    sides_for,
    subspace_overlap,
)
from ..projectors.randomized import randomized_basis
from ..projectors.storage import get_codec
from ..quant.int8 import int8_add_, int8_owner, int8_scale_
from ..quant.rounding import block_elements, scratch, write_rounded_
from .engines import LocalPlacement, Placement, engine_for, placement_for
from .members import rotation_rules
from .schedules import get_refresh_policy
from .stats import RefreshStats


def is_sharded(tensor: torch.Tensor) -> bool:
    """``True`` for a tensor a sharded engine owns (an FSDP2 ``DTensor`` shard: its state has shard shapes)."""
    return engine_for(tensor) is not None


def basis_key(side: str) -> str:
    return f"basis_{side}"


def load_bases(state: dict, group: dict, sides) -> list[torch.Tensor] | None:
    codec = get_codec(group["quant"])
    bases = [codec.decode(state, basis_key(side)) for side in sides]
    return None if any(b is None for b in bases) else bases


def refresh_basis(
    matrix: torch.Tensor | Placement,
    state: dict,
    group: dict,
    step: int,
    stats: RefreshStats,
    dtype: torch.dtype,
    sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Recompute the basis from ``matrix``; on any failure keep the old one.

    ``matrix`` is a gradient matrix or a :class:`~hf_galore.optim.engines.Placement`
    (an FSDP2 row shard): the finder runs where the placement gathers the
    full gradient, and every rank stores its part of the result. ``sync``
    (data-parallel runs, see ``hf_galore.distributed.synchronize_bases``)
    replaces each new float32 basis with the one every rank agrees on.

    A non-finite gradient would poison the basis for the next
    ``update_proj_gap`` steps, so it is skipped and counted instead.
    """
    where = matrix if not isinstance(matrix, torch.Tensor) else LocalPlacement(matrix, sync)
    if not where.agree(all_finite(where.local)):
        stats.skipped_nonfinite += 1
        stats.warn_once("nonfinite", "GaLore: non-finite gradient at a refresh step; kept the previous basis")
        return
    finder = get_projector(group["projector"])
    codec = get_codec(group["quant"])
    policy = get_refresh_policy(group["refresh"])
    sides = sides_for(group["proj_type"], where.shape)
    rank = effective_rank(group["rank"], where.shape)
    started = time.perf_counter()
    olds = [where.full_basis(codec.decode(state, basis_key(side)), side) for side in sides]
    full = where.gather()  # float32; the whole gradient only where the finder runs
    energy_fallbacks = int(state.get("energy_fallbacks", 0))  # counted per weight by the randomized finder

    def compute() -> list[torch.Tensor] | None:
        news, fallbacks = [], 0
        for side, old in zip(sides, olds):
            try:
                new = finder.find(full, rank, side, previous=old, state=state, group=group)
                if not all_finite(new):
                    raise FloatingPointError("the new basis is not finite")
            except (RuntimeError, FloatingPointError) as exc:  # e.g. SVD did not converge
                new = _fallback_basis(full, rank, side, old, step, group, stats, exc)
                if new is None:
                    return None
                fallbacks += 1
            news.append(new)
        # the count reaches every rank with the bases
        return [*news, torch.tensor([float(fallbacks)], device=where.local.device)]

    shapes = [(side_size(side, where.shape), rank) for side in sides] + [(1,)]
    results = where.on_owner(compute, shapes, state)
    full = None  # release the gathered gradient before storing
    if results is None:
        stats.refresh_failures += 1
        return
    news, fallbacks = results[:-1], int(results[-1].item())
    stats.fallbacks += fallbacks
    if group.get("rotate_moments") and all(old is not None for old in olds):
        rotate_moments_(state, [(side, new.t() @ old) for side, old, new in zip(sides, olds, news)], stats)
    policy.after_refresh(state, group, step, list(olds), list(news))
    for side, old, new in zip(sides, olds, news):
        if old is not None:
            stats.record_overlap(subspace_overlap(old, new))
        codec.encode(state, basis_key(side), where.stored_basis(new, side), dtype, group=group)
    stats.refreshes += 1
    stats.energy_fallbacks += int(state.get("energy_fallbacks", 0)) - energy_fallbacks
    stats.refresh_seconds += time.perf_counter() - started


def _fallback_basis(
    matrix: torch.Tensor,
    rank: int,
    side: str,
    old: torch.Tensor | None,
    step: int,
    group: dict,
    stats: RefreshStats,
    exc: BaseException,
) -> torch.Tensor | None:
    """A failed refresh (e.g. LAPACK's SVD not converging) retries with the randomized finder.

    Counted in ``stats.fallbacks`` by the caller (on every rank); if that
    fails too (or was the finder that failed), the old basis is kept and the
    caller counts ``stats.refresh_failures``. Warns once, where it ran.
    """
    if group["projector"] != "randomized":
        try:
            new = randomized_basis(matrix, rank, side, previous=old, step=step, group=group)
            if all_finite(new):
                stats.warn_once(
                    "fallback", f"GaLore: basis refresh failed ({exc}); used the randomized finder instead"
                )
                return new
        except (RuntimeError, FloatingPointError) as second:
            exc = second
    stats.warn_once("refresh_failure", f"GaLore: basis refresh failed ({exc}); kept the previous basis")
    return None


def rotate_moments_(state: dict, rotations: list[tuple[str, torch.Tensor]], stats: RefreshStats) -> None:
    """Carry the moments into the new subspace (group key ``rotate_moments``, off by default).

    GaLore keeps the moments' coordinates when the basis changes, so after a
    refresh they describe directions of the *old* basis. With ``C = P_newᵀ P_old``
    (``r × r``, one per side) the first moment becomes ``C M`` (left) or
    ``M Cᵀ`` (right): the old moment expressed in the new basis, with the part
    outside the new subspace dropped. The second moment is not linear in the
    gradient; it is mapped with the element-wise square ``C∘C`` (exact when
    the coordinates are uncorrelated, and it keeps ``v`` non-negative).
    Which entries rotate, and how, is each base optimizer's declaration
    (``StateKey.rotate``); the others (8-bit codes, factored statistics) are
    kept as they are, with a one-time warning.
    """
    rules = rotation_rules()
    kept = []
    for key, value in state.items():
        rule = rules.get(key, "absent")
        if rule == "absent" or not isinstance(value, torch.Tensor):
            continue
        if rule is None or value.dim() != 2:
            kept.append(key)
            continue
        out = value.float()
        for side, rotation in rotations:
            rotation = rotation.square() if rule == "squared" else rotation
            out = rotation @ out if side == "left" else out @ rotation.t()
        value.copy_(out)
    if kept:
        stats.warn_once(
            "rotate_moments",
            f"GaLore: `rotate_moments` rotates the moments their optimizer declares rotatable; kept "
            f"{', '.join(sorted(kept))} as they are",
        )


def project_gradient(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    group: dict,
    stats: RefreshStats,
    sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
    step_flag: Callable[[], torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """Low-rank gradient ``R`` of ``param`` and the bases used; refreshes or tracks first.

    The bases are returned so :func:`apply_update` reuses them instead of
    decoding (dequantizing) them twice per step. An online finder (OSD) with
    ``osd_order="project_then_update"`` projects with the basis it had and
    moves it afterwards, so the returned (old) bases also project the step
    back. Returns ``None`` when no
    basis exists yet (the very first gradient was non-finite): the weight is
    then left untouched for this step. A sharded (FSDP2 ``DTensor``)
    gradient runs the same steps through its engine's placement: this rank's
    part of ``R`` and the bases as they act on its rows come back.

    ``step_flag`` returns the step's found-inf flag (``GaLoreOptimizer._run``);
    it is called and read on the host only when a refresh is due, so that a
    skipped step keeps the basis.
    """
    where = placement_for(grad, group, as_matrix, sync)
    sides = sides_for(group["proj_type"], where.shape)
    step = int(state["step"])
    bases = load_bases(state, group, sides)
    policy = get_refresh_policy(group["refresh"])
    due = bases is None or policy.due(state, group, step)
    if bases is None:
        policy.setup(state, group, param)
    elif projects_before_tracking(group):
        # OSD's Alg. 1: R and the update use P_t; P_{t+1} is computed from G_t afterwards
        projected = _project(where, bases, sides)
        _advance_bases(where, bases, due, state, group, step, stats, param.dtype, step_flag)
        return projected
    elif due:
        # a refresh decodes the stored bases itself: a quantized codec's decoded copy held here would sit
        # beside the refresh's working set (measured: 16 MiB more per side at 4096x4096, rank 1024)
        bases = None
    if not _advance_bases(where, bases, due, state, group, step, stats, param.dtype, step_flag):
        return None
    return _project(where, load_bases(state, group, sides), sides)


def _project(
    where: Placement, bases: list[torch.Tensor], sides: tuple[str, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``R`` (this rank's part) and the bases that act on this rank's rows (what :func:`apply_update` takes)."""
    used = where.local_bases(bases, sides)
    return where.reduce_projected(project(where.local, used, sides), sides), used


def projects_before_tracking(group: dict) -> bool:
    """True for an online finder that projects before it tracks (OSD with ``osd_order="project_then_update"``)."""
    finder = get_projector(group["projector"])
    return finder.tracks_every_step and finder.projects_first(group)


def _advance_bases(
    where: Placement,
    bases: list[torch.Tensor] | None,
    due: bool,
    state: dict,
    group: dict,
    step: int,
    stats: RefreshStats,
    dtype: torch.dtype,
    step_flag: Callable[[], torch.Tensor | None] | None = None,
) -> bool:
    """Refresh the bases when ``due`` (the refresh policy's answer, or no basis yet), else move them if
    the finder tracks every step (``bases`` are then the current ones).

    Returns False when no basis exists afterwards (the first gradient was non-finite).
    """
    sides = sides_for(group["proj_type"], where.shape)
    if due:
        # a step skipped for another weight's gradient keeps the basis (a non-finite own one is counted)
        found_inf = None if step_flag is None else step_flag()
        if found_inf is None or not bool(found_inf) or not where.agree(all_finite(where.local)):
            refresh_basis(where, state, group, step, stats, dtype=dtype)
        return load_bases(state, group, sides) is not None
    finder = get_projector(group["projector"])
    if finder.tracks_every_step:
        _track(where, finder, bases, sides, state, group, dtype)
    return True


def _track(where: Placement, finder, bases: list[torch.Tensor], sides, state: dict, group: dict, dtype) -> None:
    """Move the bases with the gradient (online finders), where the full gradient is; every rank stores the result."""
    codec = get_codec(group["quant"])
    olds = [where.full_basis(basis, side) for side, basis in zip(sides, bases)]
    full = where.gather()

    def compute() -> list[torch.Tensor]:
        return [finder.track(full, old, side, state=state, group=group) for side, old in zip(sides, olds)]

    moved = where.on_owner(compute, [tuple(old.shape) for old in olds], state)
    if moved is None:
        return
    for side, old, new in zip(sides, olds, moved):
        if new is not old:
            codec.encode(state, basis_key(side), where.stored_basis(new, side), dtype, group=group)


def apply_update(
    param: torch.Tensor,
    update: torch.Tensor,
    bases: list[torch.Tensor],
    group: dict,
    *,
    decay: float | torch.Tensor | None = None,
    rounding_key: int | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """``W ← decay·W − scale · back(update)``, fused into one ``addmm_`` per weight.

    ``decay`` is decoupled weight decay's factor (``None``: none). An INT8
    weight (``hf_galore.quant.Int8Linear``) is updated on float32 copies of
    its row blocks and stored back with stochastic rounding; where
    ``found_inf`` is set (a skipped step) its codes and scales are put back
    block by block. Other weights need no ``found_inf``: a skipped step
    reaches them as a zero update and a unit decay. With a ``rounding_key`` (a bf16 /
    fp16 weight whose group has ``stochastic_rounding``, see
    ``GaLoreOptimizer._rounding_key``) the new weight is computed in float32
    block by block and rounded stochastically; without one, as before, in the
    weight's dtype, rounded to nearest.
    """
    engine = engine_for(param)
    if engine is not None:  # this rank's rows of a sharded weight, with the update they need
        where = engine.placement(param, group)
        sides = sides_for(group["proj_type"], where.shape)
        update = where.expand_update(update, sides)
        param = where.local
    else:
        sides = sides_for(group["proj_type"], matrix_shape(param.shape))
    alpha = -group["scale"]
    if rounding_key is not None and int8_owner(param) is None:
        add_to_matrix_(param, lambda matrix: _apply_rounded(matrix, update, bases, sides, alpha, decay, rounding_key))
        return
    if decay is not None:
        decay_weight_(param, decay)

    if int8_owner(param) is not None:  # float32 row blocks of the weight, stored back with SR
        floats = [b.float() for b in bases]
        update = update.float()
        int8_add_(
            param,
            lambda master, first, last: project_back_add_(master, update, floats, sides, alpha=alpha, rows=(first, last)),
            found_inf,
        )
        return
    add_to_matrix_(param, lambda matrix: project_back_add_(matrix, update, bases, sides, alpha=alpha))


def _apply_rounded(
    matrix: torch.Tensor,
    update: torch.Tensor,
    bases: list[torch.Tensor],
    sides: tuple[str, ...],
    alpha: float,
    decay: float | torch.Tensor | None,
    key: int,
) -> None:
    """:func:`apply_update` with stochastic rounding, a block of rows at a time.

    Per block: ``back(update)`` for those rows (a bf16 matmul for bf16
    weights, as round-to-nearest uses: the product's own rounding is relative
    to the update, not to the weight; float32 for fp16, whose small updates
    would underflow), added to a float32 copy of the rows, then rounded.
    """
    dtype = matrix.dtype if matrix.dtype == torch.bfloat16 else torch.float32
    bases = [b.to(dtype) for b in bases]
    update = update.to(dtype)
    cols = matrix.shape[1]
    step = max(1, block_elements(matrix.device) // max(cols, 1))

    def fill(master: torch.Tensor, start: int, stop: int) -> None:
        """``master`` holds the flat elements [start, stop) = rows [start/cols, stop/cols)."""
        first, last = start // cols, stop // cols
        master = master.view(last - first, cols)
        if decay is not None:
            master.mul_(decay)
        block = scratch(matrix.device, dtype, master.numel(), slot=1).view(master.shape)
        if sides == ("right",):
            torch.mm(update[first:last], bases[0].t(), out=block)
        elif sides == ("left",):
            torch.mm(bases[0][first:last], update, out=block)
        else:
            left, right = bases[sides.index("left")], bases[sides.index("right")]
            torch.mm(left[first:last] @ update, right.t(), out=block)
        master.add_(block, alpha=alpha)

    write_rounded_(matrix, fill, key, block_size=step * cols)


def decay_weight_(param: torch.Tensor, factor: float | torch.Tensor) -> None:
    """``W ← factor · W`` (decoupled weight decay); an INT8 weight scales its scales instead."""
    if not int8_scale_(param, factor):
        param.mul_(factor)
