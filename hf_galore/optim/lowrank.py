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
import warnings

import torch

from ..projectors import get_projector
from ..projectors.geometry import (
    as_matrix,
    effective_rank,
    project,
    project_back_add_,
    sides_for,
    subspace_overlap,
)
from ..projectors.storage import get_codec
from .schedules import get_refresh_policy
from .stats import RefreshStats

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def basis_key(side: str) -> str:
    return f"basis_{side}"


def load_bases(state: dict, group: dict, sides) -> list[torch.Tensor] | None:
    codec = get_codec(group["quant"])
    bases = [codec.decode(state, basis_key(side)) for side in sides]
    return None if any(b is None for b in bases) else bases


def refresh_basis(
    matrix: torch.Tensor, state: dict, group: dict, step: int, stats: RefreshStats, dtype: torch.dtype
) -> None:
    """Recompute the basis from ``matrix``; on any failure keep the old one.

    A non-finite gradient would poison the basis for the next
    ``update_proj_gap`` steps, so it is skipped and counted instead.
    """
    if not bool(torch.isfinite(matrix).all()):
        stats.skipped_nonfinite += 1
        _warn_once("nonfinite", "GaLore: non-finite gradient at a refresh step; kept the previous basis")
        return
    finder = get_projector(group["projector"])
    codec = get_codec(group["quant"])
    policy = get_refresh_policy(group["refresh"])
    sides = sides_for(group["proj_type"], matrix.shape)
    rank = effective_rank(group["rank"], matrix.shape)
    matrix = matrix.float()
    started = time.perf_counter()
    new_bases = []
    for side in sides:
        old = codec.decode(state, basis_key(side))
        old = None if old is None else old.float()
        try:
            new = finder.find(matrix, rank, side, previous=old, state=state, group=group)
        except (RuntimeError, torch.linalg.LinAlgError) as exc:  # e.g. SVD did not converge
            stats.refresh_failures += 1
            _warn_once("refresh_failure", f"GaLore: basis refresh failed ({exc}); kept the previous basis")
            return
        if not bool(torch.isfinite(new).all()):
            stats.refresh_failures += 1
            return
        new_bases.append((side, old, new))
    for side, old, new in new_bases:
        if old is not None:
            stats.record_overlap(subspace_overlap(old, new))
        policy.after_refresh(state, group, step, old, new)
        codec.encode(state, basis_key(side), new, dtype)
    stats.refreshes += 1
    stats.refresh_seconds += time.perf_counter() - started


def project_gradient(
    param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, stats: RefreshStats
) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """Low-rank gradient ``R`` of ``param`` and the bases used; refreshes or tracks first.

    The bases are returned so :func:`apply_update` reuses them instead of
    decoding (dequantizing) them twice per step. Returns ``None`` when no
    basis exists yet (the very first gradient was non-finite): the weight is
    then left untouched for this step.
    """
    matrix = as_matrix(grad)
    sides = sides_for(group["proj_type"], matrix.shape)
    step = int(state["step"])
    bases = load_bases(state, group, sides)
    if bases is None or get_refresh_policy(group["refresh"]).due(state, group, step):
        refresh_basis(matrix, state, group, step, stats, dtype=param.dtype)
        bases = load_bases(state, group, sides)
        if bases is None:
            return None
    else:
        finder = get_projector(group["projector"])
        if finder.tracks_every_step:
            codec = get_codec(group["quant"])
            for side, basis in zip(sides, bases):
                moved = finder.track(matrix.float(), basis.float(), side, state=state, group=group)
                if moved is not basis:
                    codec.encode(state, basis_key(side), moved, param.dtype)
            bases = load_bases(state, group, sides)
    return project(matrix, bases, sides), bases


def apply_update(param: torch.Tensor, update: torch.Tensor, bases: list[torch.Tensor], group: dict) -> None:
    """``W −= scale · back(update)``, fused into one ``addmm_`` per weight."""
    matrix = as_matrix(param)
    sides = sides_for(group["proj_type"], matrix.shape)
    project_back_add_(matrix, update, bases, sides, alpha=-group["scale"])
