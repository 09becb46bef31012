"""The registry of base optimizers (``GaLoreOptimizer`` subclasses), and what their declarations imply.

A member declares its state on the class (``state_keys``: dtype, FSDP2
sharding, rotation; ``state_layout``: shapes), so the memory estimate, the
start-up summary, the state checks, ``rotate_moments`` and the FSDP2
checkpoint hooks read it from here instead of naming members. Kept apart from
``base`` so that ``lowrank`` (which ``base`` imports) can read it too.
"""

from __future__ import annotations

from typing import Any

from ..errors import GaLoreConfigError
from ..registry import Registry

#: ``name -> GaLoreOptimizer subclass``; ``estimate_memory`` methods and the conformance matrix read it.
BASE_OPTIMIZERS: Registry[Any] = Registry("optimizer", "base optimizer")


def register_base_optimizer(cls: type) -> type:
    """Make the ``GaLoreOptimizer`` subclass ``cls`` known by ``cls.name``; usable as a class decorator.

    A state key two members share must rotate the same way (``rotate_moments``
    reads the rule by key).
    """
    rules = rotation_rules()
    for key, spec in getattr(cls, "state_keys", {}).items():
        if key in rules and rules[key] != spec.rotate:
            raise GaLoreConfigError(
                f"base optimizer {cls.name!r} declares state key {key!r} with rotate={spec.rotate!r}, but "
                f"another registered member rotates it {rules[key]!r}; use another key name"
            )
    return BASE_OPTIMIZERS.register(cls)


def rotation_rules() -> dict[str, str | None]:
    """``state key -> "linear" | "squared" | None`` over every registered member (see ``StateKey.rotate``)."""
    rules: dict[str, str | None] = {}
    for cls in BASE_OPTIMIZERS.values():
        for key, spec in getattr(cls, "state_keys", {}).items():
            rules.setdefault(key, spec.rotate)
    return rules


def follows_gradient(cls: type) -> tuple[str, ...]:
    """State keys of member ``cls`` shaped and indexed like its gradient (they shard as it does under FSDP2)."""
    return tuple(key for key, spec in getattr(cls, "state_keys", {}).items() if spec.follows_gradient)


__all__ = ["BASE_OPTIMIZERS", "follows_gradient", "register_base_optimizer", "rotation_rules"]
