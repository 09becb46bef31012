"""Where a weight's matrix lives: on this process (local, DDP) or in row shards (FSDP2).

The algorithm (``lowrank``) runs the same refresh, tracking, projection and
projection back for every weight; it reaches the matrix only through a
:class:`Placement`, the handful of distributed primitives an engine provides:
agree on a flag, gather the full gradient where the basis is computed, run
the finder there and share its result, keep this rank's part of a basis,
and finish a projection that spans ranks. :class:`LocalPlacement` is the
local engine (every primitive is the identity; DDP adds a basis broadcast
through its ``sync``). Sharded engines register themselves
(``hf_galore.distributed`` registers FSDP2's, for ``DTensor`` shards, and
the DDP engine that switches the basis broadcast on), so the core never
imports an engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch


class Placement(Protocol):
    """The distributed primitives the algorithm needs for one weight (one gradient or one parameter).

    ``shape`` is the global matrix shape and ``local`` this rank's rows of the
    matrix (the whole matrix locally). Every rank calls the same primitives
    in the same order (the optimizer's loop guarantees it): some are
    collectives.
    """

    shape: tuple[int, int]
    local: torch.Tensor

    def agree(self, flag: bool) -> bool:
        """``flag`` held on every rank that shares this weight (a logical AND)."""

    def gather(self) -> torch.Tensor | None:
        """The full float32 matrix on the rank that computes bases, ``None`` on the others."""

    def on_owner(
        self,
        compute: Callable[[], list[torch.Tensor] | None],
        shapes: Sequence[tuple[int, ...]],
        state: dict,
    ) -> list[torch.Tensor] | None:
        """Run ``compute`` where the basis is computed and give every rank its float32 results.

        ``compute`` returns tensors of ``shapes`` or ``None`` (a failed
        refresh: ``None`` on every rank). What it changed in ``state`` (a
        finder's own state) reaches every rank too.
        """

    def full_basis(self, stored: torch.Tensor | None, side: str) -> torch.Tensor | None:
        """The whole float32 basis from what this rank stores (``None`` stays ``None``)."""

    def stored_basis(self, full: torch.Tensor, side: str) -> torch.Tensor:
        """What this rank keeps of the float32 basis ``full`` (all of it, or its rows)."""

    def local_bases(self, stored: list[torch.Tensor], sides: Sequence[str]) -> list[torch.Tensor]:
        """The bases as they act on :attr:`local` (a left basis's matching rows, a whole right basis)."""

    def reduce_projected(self, low: torch.Tensor, sides: Sequence[str]) -> torch.Tensor:
        """This rank's part of ``R`` from the projection of its rows (a sum over ranks where rows contract)."""

    def expand_update(self, update: torch.Tensor, sides: Sequence[str]) -> torch.Tensor:
        """The update a rank's rows need from its part of ``U`` (the inverse layout of :meth:`reduce_projected`)."""


class LocalPlacement:
    """The local engine: the whole matrix on this process; ``sync`` (DDP) makes every rank's basis the same.

    ``sync`` is a callable ``basis -> basis`` applied to every new float32
    basis before it is stored; if it also has ``agree(flag)``, ranks agree
    on success first, so one rank's failed refresh keeps the old basis on all
    of them (instead of a broadcast only some ranks join).
    """

    __slots__ = ("local", "shape", "sync")

    def __init__(self, matrix: torch.Tensor, sync: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.local = matrix
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.sync = sync

    def agree(self, flag: bool) -> bool:
        agree = getattr(self.sync, "agree", None)
        return flag if agree is None else agree(flag)

    def gather(self) -> torch.Tensor:
        return self.local.float()

    def on_owner(self, compute, shapes, state):
        results = compute()
        if not self.agree(results is not None):
            return None
        return results if self.sync is None else [self.sync(r) for r in results]

    def full_basis(self, stored, side):
        return None if stored is None else stored.float()

    def stored_basis(self, full, side):
        return full

    def local_bases(self, stored, sides):
        return stored

    def reduce_projected(self, low, sides):
        return low

    def expand_update(self, update, sides):
        return update


class Engine(Protocol):
    """What a registered engine provides; every method may decline (return ``None``) for what it does not own."""

    def handles(self, tensor: Any) -> bool:
        """Whether ``tensor`` (a parameter or a gradient) is this engine's (e.g. a ``DTensor`` shard)."""

    def placement(self, tensor: Any, group: dict) -> Placement:
        """The primitives for ``tensor`` (one this engine :meth:`handles`) in param group ``group``."""

    def basis_sync_for(self, params: list[Any], grads: list[Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A basis broadcast for plain (unsharded) weights replicated across ranks (DDP), else ``None``.

        Asked once per optimizer, at its first low-rank step (the same step on
        every rank).
        """

    def state_dict_post_hook(self, optimizer: Any, state_dict: dict) -> dict | None:
        """Turn this engine's state in ``optimizer.state_dict()`` into what its checkpoints save."""

    def load_state_dict_pre_hook(self, optimizer: Any, state_dict: dict) -> dict | None:
        """The reverse of :meth:`state_dict_post_hook`, before ``load_state_dict``."""


_ENGINES: list[Engine] = []


def register_engine(engine: Engine) -> Engine:
    """Add ``engine`` (once: registering the same object again is a no-op)."""
    if engine not in _ENGINES:
        _ENGINES.append(engine)
    return engine


def engine_for(tensor: Any) -> Engine | None:
    """The engine that owns ``tensor``; ``None`` for a plain local tensor (no lookup at all for those)."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return None
    for engine in _ENGINES:
        if engine.handles(tensor):
            return engine
    return None


def placement_for(
    tensor: torch.Tensor,
    group: dict,
    matrix: Callable[[torch.Tensor], torch.Tensor],
    sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Placement:
    """``tensor``'s placement: its engine's, or a :class:`LocalPlacement` of ``matrix(tensor)``."""
    engine = engine_for(tensor)
    if engine is None:
        return LocalPlacement(matrix(tensor), sync)
    return engine.placement(tensor, group)


def basis_sync_for(params: list[Any], grads: list[Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The first registered engine's basis broadcast for these weights (``None``: each rank keeps its own)."""
    for engine in _ENGINES:
        sync = engine.basis_sync_for(params, grads)
        if sync is not None:
            return sync
    return None


def state_dict_post_hook(optimizer: Any, state_dict: dict) -> dict:
    """``Optimizer.register_state_dict_post_hook`` target: every engine's hook, in turn."""
    for engine in _ENGINES:
        state_dict = engine.state_dict_post_hook(optimizer, state_dict) or state_dict
    return state_dict


def load_state_dict_pre_hook(optimizer: Any, state_dict: dict) -> dict:
    """``Optimizer.register_load_state_dict_pre_hook`` target: every engine's hook, in turn."""
    for engine in _ENGINES:
        state_dict = engine.load_state_dict_pre_hook(optimizer, state_dict) or state_dict
    return state_dict


__all__ = [
    "Engine",
    "LocalPlacement",
    "Placement",
    "basis_sync_for",
    "engine_for",
    "load_state_dict_pre_hook",
    "placement_for",
    "register_engine",
    "state_dict_post_hook",
]
