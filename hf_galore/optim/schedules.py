"""When a weight's basis is refreshed, selected by the param-group key ``refresh``.

``"fixed"`` is GaLore's schedule: steps 0, T, 2T, … counted per weight from 0
exactly as galore-torch counts them (``T = update_proj_gap``). A policy keeps
whatever it needs in the per-weight ``state`` as plain scalars/tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from ..declare import Option, StateTensor, at_least, check_non_negative, check_positive_int, one_of
from ..registry import Registry


class RefreshPolicy:
    """Decides, per weight and step, whether the basis is recomputed."""

    name: ClassVar[str]
    #: the group keys this policy reads (every low-rank group accepts them)
    options: ClassVar[tuple[Option, ...]] = ()

    def state_layout(
        self, shape: tuple[int, int], rank: int, sides: Sequence[str], group: dict
    ) -> dict[str, StateTensor]:
        """The tensors this policy keeps in a weight's state once it has refreshed twice (plain ints are free).

        Counted by the memory estimate and the start-up summary; none by default.
        """
        return {}

    def due(self, state: dict, group: dict, step: int) -> bool:
        """``step`` counts this weight's completed optimizer steps (0 at the first)."""
        raise NotImplementedError

    def after_refresh(
        self, state: dict, group: dict, step: int, old: list[torch.Tensor | None], new: list[torch.Tensor]
    ) -> None:
        """Called once per successful refresh with the float32 bases of every side (two for ``proj_type="full"``).

        Once per refresh, not once per side: a two-sided weight must advance a
        policy's schedule exactly as a one-sided one does.
        """

    def setup(self, state: dict, group: dict, param: torch.Tensor) -> None:
        """Called once per weight, before its first refresh (``param`` is in ``group["params"]``)."""


class FixedGap(RefreshPolicy):
    name = "fixed"

    def due(self, state, group, step):
        return step % group["update_proj_gap"] == 0


class Staggered(RefreshPolicy):
    """Fixed gap ``T``, but each weight of a group refreshes at its own phase.

    With ``"fixed"`` every weight refreshes at steps 0, T, 2T, …, so one step in
    ``T`` pays all the SVDs at once (3.2 s against a 0.17 s step for LLaMA-60M
    on CPU, 280 s for LLaMA-7B on an H100, measured for galore-torch 1.0). Here
    weight ``i`` of ``N`` in its group refreshes when ``step % T == ⌊i·T/N⌋``
    (its first basis is still computed at step 0), so a refresh step costs
    about ``⌈N/T⌉`` SVDs. No interval is longer than ``T``. Off by default:
    ``"fixed"`` keeps galore-torch's numbers.
    """

    name = "staggered"

    def setup(self, state, group, param):
        params = group["params"]
        index = next((i for i, p in enumerate(params) if p is param), 0)
        state["refresh_phase"] = (index * group["update_proj_gap"]) // max(len(params), 1)

    def due(self, state, group, step):
        return step % group["update_proj_gap"] == state.get("refresh_phase", 0)


#: Group keys of the lazy policy with Q-GaLore's defaults (arXiv:2407.08296 §3.3;
#: VITA-Group/Q-GaLore ``run_pretrain.py``: cos_threshold 0.4, gamma_proj 2, queue_size 5).
#: Values of ``lazy_schedule``: where the next refresh falls once the gap is known.
LAZY_SCHEDULES = ("multiple", "offset")
LAZY_OPTIONS = (
    Option("lazy_threshold", 0.4, check_non_negative, "mean |cosine| above which the gap grows"),
    Option("lazy_gamma", 2.0, at_least(1), "gap growth factor (>= 1: the gap never shrinks by growth)"),
    Option("lazy_queue", 5, check_positive_int, "length of the cosine FIFO"),
    Option(
        "lazy_schedule",
        "multiple",
        one_of(*LAZY_SCHEDULES),
        "next refresh at the next multiple of the gap (q-galore-torch) or at step + gap",
    ),
)
LAZY_DEFAULTS = {option.name: option.default for option in LAZY_OPTIONS}


def leading_cosine(old: torch.Tensor, new: torch.Tensor) -> float:
    """``|cos|`` between the leading basis vectors (sign-free: singular vectors have no sign)."""
    a, b = old[:, 0].float(), new[:, 0].float()
    return float((a @ b).abs() / (a.norm() * b.norm()).clamp_min(1e-30))


class LazyRefresh(RefreshPolicy):
    """Q-GaLore's layer-adaptive refresh: a weight whose basis stops moving is refreshed less often.

    At each refresh the cosine between the leading vectors of the old and new
    basis joins a FIFO of the last ``lazy_queue`` values. When the FIFO is full
    and its mean is >= ``lazy_threshold``, the weight's interval becomes
    ``int(interval · lazy_gamma)`` (Q-GaLore's rule). Two changes: the cosine is
    taken in absolute value (Q-GaLore's signed cosine reads a sign flip of the
    same vector as -1), and a cosine below the threshold resets the interval to
    ``update_proj_gap`` and empties the FIFO, so a weight whose gradients change
    regime is tracked closely again (Q-GaLore never shortens the gap).

    ``lazy_schedule`` places the next refresh: ``"multiple"`` (default) at the
    next multiple of the current gap after this step, as q-galore-torch 1.0
    does (its projector refreshes when ``iter % update_proj_gap == 0`` and
    grows ``update_proj_gap`` in place); ``"offset"`` at ``step + gap``. With
    ``T = 10`` and a gap doubling at every refresh from step 50 on, they give
    0…50, 60, 80, 160, 320, 640 and 0…50, 70, 110, 190, 350, 670.

    Per-weight state: ``lazy_gap`` and ``lazy_next`` (ints), ``lazy_cos``
    (float32 FIFO) and ``lazy_count`` (int).
    """

    name = "lazy"
    options = LAZY_OPTIONS

    def state_layout(self, shape, rank, sides, group):
        """The float32 cosine FIFO of ``lazy_queue`` values."""
        size = int(group.get("lazy_queue", LAZY_DEFAULTS["lazy_queue"]))
        return {"lazy_cos": StateTensor((size,), torch.float32)}

    def due(self, state, group, step):
        if "lazy_next" not in state:
            return step % group["update_proj_gap"] == 0
        return step >= state["lazy_next"]

    def after_refresh(self, state, group, step, old, new):
        base = int(group["update_proj_gap"])
        size = int(group.get("lazy_queue", LAZY_DEFAULTS["lazy_queue"]))
        threshold = float(group.get("lazy_threshold", LAZY_DEFAULTS["lazy_threshold"]))
        gamma = float(group.get("lazy_gamma", LAZY_DEFAULTS["lazy_gamma"]))
        gap = int(state.get("lazy_gap", base))
        if all(o is not None for o in old):
            queue = state.get("lazy_cos")
            if queue is None or queue.numel() != size:
                queue = torch.zeros(size, dtype=torch.float32)
            # a two-sided basis is stable only if both sides are
            cos = min(leading_cosine(o, n) for o, n in zip(old, new))
            queue = torch.roll(queue, -1)
            queue[-1] = cos
            count = min(int(state.get("lazy_count", 0)) + 1, size)
            if cos < threshold:
                gap, count = base, 0
            elif count == size and float(queue.mean()) >= threshold:
                gap = max(int(gap * gamma), 1)
            state["lazy_cos"] = queue
            state["lazy_count"] = count
        state["lazy_gap"] = gap
        if group.get("lazy_schedule", LAZY_DEFAULTS["lazy_schedule"]) == "offset":
            state["lazy_next"] = step + gap
        else:  # q-galore-torch: the first step after this one with step % gap == 0
            state["lazy_next"] = (step // gap + 1) * gap


REFRESH_POLICIES: Registry[RefreshPolicy] = Registry("refresh", "refresh policy", declares_options=True)
register_refresh_policy = REFRESH_POLICIES.register
get_refresh_policy = REFRESH_POLICIES.lookup


register_refresh_policy(FixedGap())
register_refresh_policy(Staggered())
register_refresh_policy(LazyRefresh())
