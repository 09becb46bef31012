"""When a weight's basis is refreshed, selected by the param-group key ``refresh``.

``"fixed"`` is GaLore's schedule: steps 0, T, 2T, … counted per weight from 0
exactly as galore-torch counts them (``T = update_proj_gap``). A policy keeps
whatever it needs in the per-weight ``state`` as plain scalars/tensors.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import GaLoreConfigError, format_choices


class RefreshPolicy:
    """Decides, per weight and step, whether the basis is recomputed."""

    name: ClassVar[str]

    def due(self, state: dict, group: dict, step: int) -> bool:
        """``step`` counts this weight's completed optimizer steps (0 at the first)."""
        raise NotImplementedError

    def after_refresh(
        self, state: dict, group: dict, step: int, old: torch.Tensor | None, new: torch.Tensor
    ) -> None:
        """Called once per successful refresh with the float32 bases (one side)."""


class FixedGap(RefreshPolicy):
    name = "fixed"

    def due(self, state, group, step):
        return step % group["update_proj_gap"] == 0


REFRESH_POLICIES: dict[str, RefreshPolicy] = {}


def register_refresh_policy(policy: RefreshPolicy) -> RefreshPolicy:
    """Make ``policy`` selectable as ``refresh=policy.name``; names are unique."""
    if policy.name in REFRESH_POLICIES:
        raise GaLoreConfigError(f"refresh policy {policy.name!r} is already registered")
    REFRESH_POLICIES[policy.name] = policy
    return policy


def get_refresh_policy(name: str) -> RefreshPolicy:
    try:
        return REFRESH_POLICIES[name]
    except KeyError:
        raise GaLoreConfigError(
            f"`refresh` must be one of {format_choices(REFRESH_POLICIES)}, got {name!r}"
        ) from None


register_refresh_policy(FixedGap())
