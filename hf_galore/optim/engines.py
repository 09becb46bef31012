"""Where a weight's update runs: locally (the default), or on shards by a registered engine.

The algorithm (``lowrank``, ``base``, ``state_checks``) asks :func:`engine_for`
whether a tensor belongs to an engine and, if so, hands it the projection and
the update; engines register themselves (``hf_galore.distributed`` registers
FSDP2's, for ``DTensor`` shards, when ``hf_galore`` is imported). So the core
never imports an engine, and the sharded path is the engine's business only.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class ShardedEngine(Protocol):
    """What the algorithm asks of an engine for the tensors it :meth:`handles`."""

    def handles(self, tensor: Any) -> bool:
        """Whether ``tensor`` (a parameter or a gradient) is this engine's (e.g. a ``DTensor`` shard)."""

    def project_gradient(
        self, param: Any, grad: Any, state: dict, group: dict, stats: Any, *, step_flag: Any = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """As ``lowrank.project_gradient``, on shards."""

    def apply_update(self, param: Any, update: torch.Tensor, bases: list[torch.Tensor], group: dict) -> None:
        """As ``lowrank.apply_update``, on shards."""

    def state_dict_post_hook(self, optimizer: Any, state_dict: dict) -> dict | None:
        """Turn this engine's state in ``optimizer.state_dict()`` into what its checkpoints save."""

    def load_state_dict_pre_hook(self, optimizer: Any, state_dict: dict) -> dict | None:
        """The reverse of :meth:`state_dict_post_hook`, before ``load_state_dict``."""


_ENGINES: list[ShardedEngine] = []


def register_engine(engine: ShardedEngine) -> ShardedEngine:
    """Add ``engine`` (once: registering the same object again is a no-op)."""
    if engine not in _ENGINES:
        _ENGINES.append(engine)
    return engine


def engine_for(tensor: Any) -> ShardedEngine | None:
    """The engine that owns ``tensor``; ``None`` for a plain local tensor (no lookup at all for those)."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return None
    for engine in _ENGINES:
        if engine.handles(tensor):
            return engine
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
    "ShardedEngine",
    "engine_for",
    "load_state_dict_pre_hook",
    "register_engine",
    "state_dict_post_hook",
]
