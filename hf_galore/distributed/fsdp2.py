"""FSDP2 (``torch.distributed.fsdp.fully_shard``): GaLore's one algorithm on ``Shard(0)`` row shards.

Gradients and weights are ``DTensor`` row shards. This module provides only
the distributed primitives (:class:`ShardedPlacement`); ``optim/lowrank.py``
runs the refresh (fallbacks, energy guard, codecs, refresh policies),
tracking, projection and projection back on them, as on one device:

- right basis ``Q`` (``G Q``): ``(G Q)_i = G_i Q``, no reduction; ``Q`` is
  stored as row shards and all-gathered on use (``n × r``, transient);
- left basis ``P`` (``Pᵀ G``): ``P`` is stored as the row shard ``P_i``
  that matches ``W_i``; ``Pᵀ G = Σ_i P_iᵀ G_i`` is reduce-scattered by
  columns, so each rank keeps ``r × n/world`` moments; the update is
  all-gathered (``r × n``) and applied as ``W_i −= s · P_i N``.

So moments *and* dense bases are sharded (quantized bases are kept whole,
see ``_shards.shards_bases``). The basis is computed by one rank (rank 0 of
the shard group): the gradient shards of one weight are gathered there
(never on every rank), the finder runs on the full matrix (the same
computation as one process, so the numbers match it), and the result is
broadcast; each rank keeps its part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..optim import lowrank
from ..optim.engines import register_engine
from ..projectors.geometry import side_size
from . import checkpoint
from ._shards import (
    Rows,
    basis_shard,
    dist,
    global_matrix_shape,
    is_sharded_tensor,
    local_matrix,
    shards_bases,
)


def _version(value: Any) -> Any:
    return (
        (id(value), value._version)
        if isinstance(value, torch.Tensor)
        else ("value", repr(value))
    )


def _share_state(rows: Rows, state: dict, before: dict[str, Any] | None) -> None:
    """Copy every ``state`` entry rank 0's finder added or changed to the other ranks.

    Finders may keep per-weight state (an online-PCA optimizer's moments, a
    generator's position). It is computed on rank 0 only; replicating it keeps
    every rank's state dict alike, which checkpointing (and a later owner)
    relies on.
    """
    comm = dist()
    meta = None
    if rows.rank == 0:
        meta = []
        for key, value in state.items():
            if before is not None and before.get(key) == _version(value):
                continue
            if isinstance(value, torch.Tensor):
                meta.append((key, tuple(value.shape), value.dtype))
            else:
                meta.append((key, None, value))
    box = [meta]
    comm.broadcast_object_list(box, group=rows.group, group_src=0)
    for key, shape, info in box[0]:
        if shape is None:
            state[key] = info
            continue
        tensor = (
            state[key].contiguous()
            if rows.rank == 0
            else torch.empty(shape, dtype=info)
        )
        wire = tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor
        comm.broadcast(wire, group=rows.group, group_src=0)
        if rows.rank != 0:
            state[key] = tensor


#: what rank 0 tells the shard group after running a computation
_OK, _FAILED, _RAISED = 0, 1, 2


class ShardedPlacement:
    """The primitives ``optim/lowrank.py`` runs on for one ``Shard(0)`` DTensor (``optim.engines.Placement``)."""

    __slots__ = ("local", "rows", "shape", "whole_bases")

    def __init__(self, tensor: Any, group: dict) -> None:
        self.rows = Rows(tensor)
        self.shape = global_matrix_shape(tensor)
        self.local = local_matrix(tensor)
        self.whole_bases = not shards_bases(group)

    def agree(self, flag: bool) -> bool:
        return self.rows.all_true(flag)

    def gather(self) -> torch.Tensor | None:
        return self.rows.gather_rows(self.local.float(), self.shape[0])  # one full gradient, on rank 0 only

    def on_owner(
        self,
        compute: Callable[[], list[torch.Tensor] | None],
        shapes: Sequence[tuple[int, ...]],
        state: dict,
    ) -> list[torch.Tensor] | None:
        """Run ``compute`` on rank 0 and broadcast its float32 results; ``None`` on every rank if it failed.

        Whatever the finder wrote into ``state`` on rank 0 is replicated too.
        An exception on rank 0 is raised on every rank (not a hang in the
        next collective).
        """
        rows = self.rows
        results, before, error = None, None, None
        if rows.rank == 0:
            before = {key: _version(value) for key, value in state.items()}
            try:
                results = compute()
            except Exception as exc:  # noqa: BLE001 - re-raised below, once every rank knows
                error = exc
        status = rows.broadcast_int(_RAISED if error is not None else _FAILED if results is None else _OK)
        if status == _RAISED:
            if error is not None:
                raise error
            raise RuntimeError("GaLore: computing a basis raised on rank 0 of the FSDP2 shard group (see its error)")
        _share_state(rows, state, before)
        if status == _FAILED:
            return None
        if rows.rank != 0:
            results = [torch.empty(shape, dtype=torch.float32, device=self.local.device) for shape in shapes]
        return [rows.broadcast(r.float()) for r in results]

    def full_basis(self, stored: torch.Tensor | None, side: str) -> torch.Tensor | None:
        if stored is None:
            return None
        if self.whole_bases:
            return stored.float()
        return self.rows.all_gather_rows(stored.float(), side_size(side, self.shape))

    def stored_basis(self, full: torch.Tensor, side: str) -> torch.Tensor:
        return full if self.whole_bases else basis_shard(self.rows, full)

    def local_bases(self, stored: list[torch.Tensor], sides: Sequence[str]) -> list[torch.Tensor]:
        out = []
        for side, basis in zip(sides, stored):
            if side == "right":  # Q acts on whole rows: sharded at rest, gathered on use
                out.append(basis if self.whole_bases else self.rows.all_gather_rows(basis, self.shape[1]))
            elif self.whole_bases:  # P's rows that match this rank's rows of W
                a, b = self.rows.bounds(self.shape[0])
                out.append(basis[a:b])
            else:
                out.append(basis)
        return out

    def reduce_projected(self, low: torch.Tensor, sides: Sequence[str]) -> torch.Tensor:
        if tuple(sides) == ("right",):  # G_i Q: this rank's rows of R
            return low
        if tuple(sides) == ("left",):  # Σ_i P_iᵀ G_i, this rank's column chunk
            return self.rows.reduce_scatter_cols(low)
        dist().all_reduce(low, group=self.rows.group)  # Pᵀ G Q, r × r on every rank
        return low

    def expand_update(self, update: torch.Tensor, sides: Sequence[str]) -> torch.Tensor:
        if tuple(sides) == ("left",):  # W_i −= s · P_i N needs all of N's columns
            return self.rows.all_gather_cols(update, self.shape[1])
        return update


def project_sharded_gradient(
    param: Any, grad: Any, state: dict, group: dict, stats: Any, step_flag: Any = None
) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """:func:`hf_galore.optim.lowrank.project_gradient` for a ``Shard(0)`` DTensor (what the optimizer calls).

    Returns this rank's part of the low-rank gradient (``G_i Q`` rows, or a
    column chunk of ``Pᵀ G``; ``Pᵀ G Q`` whole for ``proj_type="full"``) and
    the bases :func:`apply_sharded_update` needs. Every rank must call it for
    the same weights in the same order (collectives inside), which the
    optimizer's loop guarantees.
    """
    if not is_sharded_tensor(grad):
        raise TypeError(f"`grad` must be a DTensor shard, got {type(grad).__name__}")
    return lowrank.project_gradient(param, grad, state, group, stats, step_flag=step_flag)


def apply_sharded_update(param: Any, update: torch.Tensor, bases: list[torch.Tensor], group: dict) -> None:
    """``W_i −= scale · back(update)_i`` on this rank's rows of a DTensor weight, in place."""
    if not is_sharded_tensor(param):
        raise TypeError(f"`param` must be a DTensor shard, got {type(param).__name__}")
    lowrank.apply_update(param, update, bases, group)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state held by *this* rank, split into bases / low-rank moments / full-rank.

    DTensor states count their local shard only. Used by the tests and by
    ``benchmarks/distributed_state.py`` to show that FSDP2 shards everything.
    """
    out = {"bases": 0, "lowrank_moments": 0, "full_rank": 0}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor) or key == "step":
                    continue
                local = value.to_local() if is_sharded_tensor(value) else value
                nbytes = local.numel() * local.element_size()
                if key.startswith("basis_"):
                    out["bases"] += nbytes
                elif "rank" in group:
                    out["lowrank_moments"] += nbytes
                else:
                    out["full_rank"] += nbytes
    out["total"] = sum(out.values())
    return out


class FSDP2Engine:
    """The FSDP2 engine (``hf_galore.optim.engines``): placements for ``DTensor`` shards, and their checkpoints."""

    def handles(self, tensor: Any) -> bool:
        return is_sharded_tensor(tensor)

    def placement(self, tensor: Any, group: dict) -> ShardedPlacement:
        return ShardedPlacement(tensor, group)

    def basis_sync_for(self, params: list[Any], grads: list[Any]) -> None:
        return None  # a sharded weight's basis is computed once and broadcast by its placement

    def state_dict_post_hook(self, optimizer, state_dict):
        return checkpoint.sharded_state_dict_post_hook(optimizer, state_dict)

    def load_state_dict_pre_hook(self, optimizer, state_dict):
        return checkpoint.sharded_load_state_dict_pre_hook(optimizer, state_dict)


FSDP2_ENGINE = register_engine(FSDP2Engine())

__all__ = [
    "FSDP2_ENGINE",
    "FSDP2Engine",
    "ShardedPlacement",
    "apply_sharded_update",
    "is_sharded_tensor",
    "optimizer_state_bytes",
    "project_sharded_gradient",
]
