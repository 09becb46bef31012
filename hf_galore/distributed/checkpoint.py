"""FSDP2 checkpoints: the low-rank shards an optimizer keeps appear as ``DTensor`` s in its ``state_dict``.

So ``torch.distributed.checkpoint`` (and accelerate's FSDP2 checkpoints
built on it) saves, reshards and gathers every rank's part instead of
keeping one rank's copy of what looks like a replicated tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..optim import lowrank
from ..optim.members import follows_gradient
from ..projectors.geometry import effective_rank, side_size, sides_for
from ._shards import Rows, global_matrix_shape, is_sharded_tensor, shards_bases


def _sharded_state_layouts(
    param: Any, group: dict, moment_keys: Iterable[str]
) -> tuple[Rows, dict[str, tuple[tuple[int, int], int]]]:
    """Global shape and split dimension of each low-rank state key this module keeps as a local shard.

    ``moment_keys``: the base optimizer's keys that follow the gradient (``members.follows_gradient``).
    """
    rows = Rows(param)
    m, n = global_matrix_shape(param)
    sides = sides_for(group["proj_type"], (m, n))
    r = effective_rank(group["rank"], (m, n))
    layouts: dict[str, tuple[tuple[int, int], int]] = {}
    if shards_bases(group):  # dense bases: row shards of (k, r); quantized ones are whole on every rank
        for side in sides:
            layouts[lowrank.basis_key(side)] = ((side_size(side, (m, n)), r), 0)
    if sides == ("right",):  # G_i Q: rows
        moment = ((m, r), 0)
    elif sides == ("left",):  # column chunk of Pᵀ G
        moment = ((r, n), 1)
    else:  # r x r, replicated: identical on every rank, already checkpoint-safe
        moment = None
    if moment is not None:
        for key in moment_keys:
            layouts[key] = moment
    return rows, layouts


def sharded_state_dict_post_hook(
    optimizer: torch.optim.Optimizer, state_dict: dict
) -> dict:
    """``Optimizer.state_dict`` post-hook: show FSDP2 low-rank shards as ``DTensor`` s.

    The low-rank moments and bases of a ``Shard(0)`` weight are plain local
    tensors during training (each rank its own rows or columns).
    ``torch.distributed.checkpoint`` (and accelerate's FSDP2 checkpoints built
    on it) would take plain tensors for replicated ones and keep one rank's
    copy; as DTensors with their true global shape they are saved, resharded
    and gathered (``full_state_dict=True``) correctly. The live state is not
    touched: entries are copied before values are replaced, and the DTensors
    share the live storage. States of other layouts (8-bit blocks, factored
    Adafactor statistics, quantized bases) stay local.
    """
    packed = state_dict["state"]
    for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        if "rank" not in group:
            continue
        for param, pid in zip(group["params"], saved["params"]):
            if pid not in packed or not is_sharded_tensor(param):
                continue
            rows, layouts = _sharded_state_layouts(param, group, follows_gradient(type(optimizer)))
            entry = dict(packed[pid])
            for key, (shape, dim) in layouts.items():
                value = entry.get(key)
                if (
                    not isinstance(value, torch.Tensor)
                    or is_sharded_tensor(value)
                    or value.dim() != 2
                ):
                    continue
                a, b = rows.bounds(shape[dim])
                expected = (b - a, shape[1]) if dim == 0 else (shape[0], b - a)
                if tuple(value.shape) == expected:
                    entry[key] = rows.as_dtensor(value, shape, dim)
            packed[pid] = entry
    return state_dict


def sharded_load_state_dict_pre_hook(
    optimizer: torch.optim.Optimizer, state_dict: dict
) -> dict:
    """``Optimizer.load_state_dict`` pre-hook: back to this rank's local shards (inverse of the post-hook)."""
    packed = state_dict["state"]
    for saved in state_dict["param_groups"]:
        if "rank" not in saved:
            continue
        for pid in saved["params"]:
            entry = packed.get(pid)
            if not entry or not any(is_sharded_tensor(v) for v in entry.values()):
                continue
            packed[pid] = {
                k: (v.to_local() if is_sharded_tensor(v) else v)
                for k, v in entry.items()
            }
    return state_dict


__all__ = ["sharded_load_state_dict_pre_hook", "sharded_state_dict_post_hook"]
