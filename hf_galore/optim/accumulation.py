"""Gradient accumulation in the subspace: each micro-batch's gradient is projected and freed at once.

Between two refreshes a weight's basis ``P`` is fixed and projection is
linear, so ``Σ_k Pᵀ G_k = Pᵀ Σ_k G_k``: the accumulated projected gradient
(``r × n``, or ``m × r``) is all a low-rank step needs. A weight is
accumulated here only where that identity holds for the step its gradient
belongs to (:func:`accumulates_in_subspace`): it has a basis, its refresh
policy does not refresh it at that step (a refresh needs the full
accumulated gradient), and its finder does not move the basis from the full
gradient every step (Online Subspace Descent). Every other weight keeps its
full gradient, which autograd accumulates as usual.

The norm of the accumulated *full* gradient cannot be read from projections.
Each micro-batch's gradient splits into its projection and a residual
``E_k = G_k − P Pᵀ G_k`` orthogonal to the subspace, whose norm is
``√(‖G_k‖² − ‖Pᵀ G_k‖²)`` for an orthonormal basis, so

    ‖Σ_k G_k‖² = ‖Σ_k Pᵀ G_k‖² + ‖Σ_k E_k‖² ≤ ‖Σ_k Pᵀ G_k‖² + (Σ_k ‖E_k‖)²

(the triangle inequality on the residuals). :meth:`Accumulated.norm_bound`
is that upper bound: exact for one micro-batch and for residuals pointing
the same way, at most ``√k`` times the residual's part otherwise. Clipping
with it never lets a step exceed its threshold.

The accumulators are not optimizer state: like ``.grad`` they are not in
``state_dict()`` (checkpoints are taken at step boundaries, as the Trainer
does), and ``zero_grad()`` discards them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedSetupError
from ..numerics import l2_norm
from ..projectors import get_projector
from ..projectors.geometry import as_matrix, matrix_shape, project, sides_for
from .lowrank import is_sharded, load_bases
from .schedules import get_refresh_policy

#: Values of the group key ``accumulate``. ``"auto"``: in the subspace in layer-wise mode, in full
#: (autograd's ``.grad``) in regular mode; ``"lowrank"``: in the subspace in both (the regular optimizer
#: registers gradient hooks that project and free each gradient); ``"full"``: never in the subspace.
ACCUMULATE_MODES = ("auto", "lowrank", "full")
#: Values of the group key ``accumulate_dtype``: ``None`` keeps the gradient's dtype (as autograd
#: accumulates ``.grad``), ``"float32"`` sums in float32 and rounds once, at the step.
ACCUMULATE_DTYPES = (None, "float32")


def accumulates_in_subspace(group: Mapping[str, Any], layerwise: bool) -> bool:
    """Whether ``group``'s weights accumulate in the subspace when driven this way (layer-wise or not).

    Never for a finder that moves its basis from every step's full gradient
    (its declaration ``tracks_every_step``: Online Subspace Descent).
    """
    if "rank" not in group or _tracks_every_step(group):
        return False
    mode = group.get("accumulate", "auto")
    return mode == "lowrank" or (mode == "auto" and layerwise)


def _tracks_every_step(group: Mapping[str, Any]) -> bool:
    return get_projector(group["projector"]).tracks_every_step


@dataclass
class Accumulated:
    """One weight's projected gradients of the current accumulation window."""

    #: ``Σ_k Pᵀ G_k`` (the shape of ``R``), in the gradient's dtype or float32 (``accumulate_dtype``)
    low: torch.Tensor
    #: ``Σ_k ‖E_k‖``, float32: the residuals' contribution to :meth:`norm_bound`
    residual: torch.Tensor
    #: the dtype of the gradients (what ``R`` is handed to the base update in)
    grad_dtype: torch.dtype
    #: the weight's completed-step count the window belongs to
    step: int
    #: the stored basis tensors the projections used (a window never spans two bases)
    basis_refs: tuple[torch.Tensor, ...]

    def norm_bound(self) -> torch.Tensor:
        """An upper bound of the accumulated full gradient's L2 norm (float32 scalar; see the module doc)."""
        return (l2_norm(self.low).square() + self.residual.square()).sqrt()

    def scale_(self, factor: torch.Tensor) -> None:
        """Multiply the accumulated gradient by ``factor`` (clipping): the step sees ``factor·Σ_k G_k``."""
        self.low.mul_(factor.to(self.low.dtype))
        self.residual.mul_(factor.to(self.residual.dtype))


def _basis_refs(state: dict) -> tuple[torch.Tensor, ...]:
    """The stored basis tensors of ``state`` (dense or a codec's keys), in a fixed order."""
    return tuple(v for k, v in sorted(state.items()) if k.startswith("basis_") and isinstance(v, torch.Tensor))


def _eligible(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, refs: tuple) -> bool:
    """Whether ``grad`` may be folded into the subspace for the step ``state['step']`` counts (``refs``: the
    stored basis tensors)."""
    if grad.is_sparse or grad.is_complex() or is_sharded(param) or type(grad) is not torch.Tensor:
        return False  # FSDP2 / DTensor gradients: accumulated by the engine, in full
    if "step" not in state or not refs or _tracks_every_step(group):
        return False  # no basis yet; or the finder moves its basis from each step's full gradient
    # the refresh at this step needs the whole window's full gradient
    return not get_refresh_policy(group["refresh"]).due(state, group, int(state["step"]))


def absorb(
    pending: dict[torch.Tensor, Accumulated], param: torch.Tensor, group: dict, state: dict
) -> bool:
    """Fold ``param.grad`` into ``param``'s accumulator and free it; ``False`` (gradient kept) where it may not be.

    ``state`` must already fit ``group`` (``GaLoreOptimizer._refit_state``).
    The first gradient of a window decides: once a weight accumulates in the
    subspace it does so until the step, and a later gradient that cannot be
    projected into the same basis is an error (the basis cannot change
    inside a window).
    """
    grad = param.grad
    if grad is None:
        return False
    entry = pending.get(param)
    refs = _basis_refs(state)
    if entry is None:
        if not _eligible(param, grad, state, group, refs):
            return False
    else:
        check_window(entry, param, state, refs)
    sides = sides_for(group["proj_type"], matrix_shape(param.shape))
    bases = load_bases(state, group, sides)
    if bases is None:
        return False
    low = project(as_matrix(grad), bases, sides)
    residual_sq = (l2_norm(grad).square() - l2_norm(low).square()).clamp_min(0.0)
    if entry is None:
        dtype = torch.float32 if group.get("accumulate_dtype") == "float32" else grad.dtype
        entry = Accumulated(
            low=low.to(dtype),  # a new tensor: the product never aliases the gradient
            residual=residual_sq.sqrt(),
            grad_dtype=grad.dtype,
            step=int(state["step"]),
            basis_refs=refs,
        )
        pending[param] = entry
    else:
        entry.low.add_(low.to(entry.low.dtype))
        entry.residual.add_(residual_sq.sqrt())
    param.grad = None
    return True


def check_window(entry: Accumulated, param: torch.Tensor, state: dict, refs: tuple | None = None) -> None:
    """Refuse an accumulator whose basis or step changed since its first micro-batch (``refs``: the stored
    basis tensors, when the caller has them)."""
    refs = _basis_refs(state) if refs is None else refs
    same_basis = len(refs) == len(entry.basis_refs) and all(a is b for a, b in zip(refs, entry.basis_refs))
    if "step" not in state or int(state["step"]) != entry.step or not same_basis:
        raise UnsupportedSetupError(
            f"the weight of shape {tuple(param.shape)} has gradients accumulated in its subspace since step "
            f"{entry.step}, but its basis or step changed before the accumulation window ended (the state was "
            "loaded, re-made or stepped by another optimizer in the middle of a window). Call `zero_grad()` "
            "to discard the window, or load checkpoints at step boundaries only"
        )


def finish(entry: Accumulated, param: torch.Tensor, state: dict, group: dict) -> tuple[torch.Tensor, list]:
    """The window's ``R`` (in the gradient's dtype) and the decoded bases that project the step back."""
    check_window(entry, param, state)
    sides = sides_for(group["proj_type"], matrix_shape(param.shape))
    bases = load_bases(state, group, sides)
    low = entry.low if entry.low.dtype == entry.grad_dtype else entry.low.to(entry.grad_dtype)
    return low, bases


_DISTRIBUTED = (
    "`accumulate='lowrank'` with the regular optimizer runs in one process only: its gradient hooks free each "
    "gradient before DDP (or FSDP) reduces it across ranks. Use `accumulate='full'` (the default of the regular "
    "optimizer) with more than one process"
)


def gradient_hook(ref: weakref.ref, owner_of: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], None]:
    """The regular optimizer's gradient hook for ``accumulate="lowrank"``: project and free each gradient.

    Holds the optimizer weakly, and is silent while another optimizer owns
    the parameter (``owner_of``; a ``LayerwiseOptimizer`` wrapping this one
    projects in its own hooks). Refuses more than one process by name.
    """

    def hook(param: torch.Tensor) -> None:
        optimizer = ref()
        if optimizer is None or owner_of(param) is not optimizer:
            return
        group = optimizer._group_of(param)
        if group is None or not accumulates_in_subspace(group, layerwise=False):
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            raise UnsupportedSetupError(_DISTRIBUTED)
        optimizer.accumulate_gradient(param)

    return hook


def clip_grad_norm_(
    params: list[torch.Tensor], pending: dict[torch.Tensor, Accumulated], max_norm: float
) -> torch.Tensor:
    """Scale every ``.grad`` of ``params`` and every accumulator in ``pending`` by ``min(1, c / (norm + 1e-6))``.

    ``norm`` is the global L2 norm: ``.grad`` norms, and :meth:`Accumulated.norm_bound`
    for the weights accumulated in their subspace (each weight has one or the
    other). Returns the pre-clip norm, as ``torch.nn.utils.clip_grad_norm_``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    squares = [l2_norm(g).square() for g in grads]
    squares += [pending[p].norm_bound().square() for p in params if p.grad is None and p in pending]
    if not squares:
        return torch.tensor(0.0)
    device = squares[0].device
    total = torch.stack([s.to(device) for s in squares]).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    for entry in pending.values():
        entry.scale_(coef.to(entry.low.device))
    return total


__all__ = [
    "ACCUMULATE_DTYPES",
    "ACCUMULATE_MODES",
    "Accumulated",
    "absorb",
    "accumulates_in_subspace",
    "check_window",
    "clip_grad_norm_",
    "finish",
    "gradient_hook",
]
