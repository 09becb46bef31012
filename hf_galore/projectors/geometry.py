"""Pure functions for the projection geometry shared by every projector.

``proj_type`` follows galore-torch's convention:

============  ==================  ==================
proj_type     m >= n              m < n
============  ==================  ==================
std           right (``G B``)     left (``Bᵀ G``)
reverse_std   left                right
left          left                left
right         right               right
full          both sides          both sides
============  ==================  ==================

"std" projects onto the *smaller* side, so the basis costs ``r·min(m, n)``
and the moments ``r·max(m, n)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..errors import GaLoreConfigError, format_choices
from .base import Side

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def sides_for(proj_type: str, shape: Sequence[int]) -> tuple[Side, ...]:
    """Which side(s) a weight of 2-D ``shape`` is projected on."""
    m, n = shape
    if proj_type == "std":
        return ("right",) if m >= n else ("left",)
    if proj_type == "reverse_std":
        return ("left",) if m >= n else ("right",)
    if proj_type == "left":
        return ("left",)
    if proj_type == "right":
        return ("right",)
    if proj_type == "full":
        return ("left", "right")
    raise GaLoreConfigError(f"`proj_type` must be one of {format_choices(PROJ_TYPES)}, got {proj_type!r}")


def effective_rank(rank: int, shape: Sequence[int]) -> int:
    """The rank actually used: a basis cannot have more columns than rows."""
    return min(rank, *shape)


def side_size(side: Side, shape: Sequence[int]) -> int:
    return shape[0] if side == "left" else shape[1]


def projected_shape(shape: Sequence[int], rank: int, sides: Sequence[Side]) -> tuple[int, int]:
    """Shape of the low-rank gradient ``R`` for a 2-D weight."""
    m, n = shape
    r = effective_rank(rank, shape)
    return (r if "left" in sides else m, r if "right" in sides else n)


def project(grad: torch.Tensor, bases: Sequence[torch.Tensor], sides: Sequence[Side]) -> torch.Tensor:
    """``R = Bᵀ G`` (left), ``G B`` (right) or ``Bₗᵀ G Bᵣ`` (both)."""
    out = grad
    for basis, side in zip(bases, sides):
        basis = basis.to(grad.dtype)
        out = basis.t() @ out if side == "left" else out @ basis
    return out


def project_back_add_(
    target: torch.Tensor,
    update: torch.Tensor,
    bases: Sequence[torch.Tensor],
    sides: Sequence[Side],
    alpha: float,
    rows: tuple[int, int] | None = None,
) -> None:
    """``target += alpha · back(update)`` in place, without a full-size temporary.

    Fusing the back-projection into ``addmm_`` saves the two full ``m × n``
    passes (project back, then scale and add) that galore-torch makes. With
    ``rows = (first, last)``, ``target`` holds only those rows of the weight
    and gets those rows of the back-projection (a weight updated block by
    block, such as an INT8 one).
    """
    casted = [b.to(target.dtype) for b in bases]
    update = update.to(target.dtype)
    first, last = rows if rows is not None else (0, target.shape[0])
    if len(sides) == 2:  # full: Bₗ N Bᵣᵀ; the inner product stays low-rank
        left, right = casted[sides.index("left")], casted[sides.index("right")]
        target.addmm_(left[first:last] @ update, right.t(), alpha=alpha)
    elif sides[0] == "left":
        target.addmm_(casted[0][first:last], update, alpha=alpha)
    else:
        target.addmm_(update[first:last], casted[0].t(), alpha=alpha)


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """2-D form of a weight: ``(shape[0], prod(shape[1:]))``.

    Tensors with more than two dimensions (e.g. convolution kernels
    ``out × in × kh × kw``) are projected as the matrix that maps inputs to
    outputs, the usual reading of a weight. It is a view when the memory
    layout allows one and a copy otherwise (e.g. a ``channels_last`` kernel):
    write into a weight with :func:`add_to_matrix_`, never into this.
    """
    if tensor.dim() == 2:
        return tensor
    return tensor.reshape(tensor.shape[0], -1)


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The shape of :func:`as_matrix` of a tensor of ``shape``, without touching memory."""
    return (int(shape[0]), math.prod(int(s) for s in shape[1:]))


def add_to_matrix_(tensor: torch.Tensor, add_: Callable[[torch.Tensor], None]) -> None:
    """Run the in-place ``add_`` on ``tensor``'s 2-D form so that the change reaches ``tensor``.

    A layout with no 2-D view (``channels_last``) is updated on a contiguous
    copy that is copied back, keeping the tensor's own layout.
    """
    matrix = as_matrix(tensor)
    add_(matrix)
    if matrix.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
        tensor.copy_(matrix.view(tensor.shape))


def subspace_overlap(old: torch.Tensor, new: torch.Tensor) -> float:
    """``‖Bₒₗ𝒹ᵀ B_new‖²_F / r`` in [0, 1]: 1 when the subspaces coincide.

    It is the mean squared cosine of the principal angles, so it does not
    depend on sign flips or rotations inside the subspace.
    """
    old = old.float()
    new = new.float()
    r = min(old.shape[1], new.shape[1])
    return float((old.t() @ new).square().sum() / r)
