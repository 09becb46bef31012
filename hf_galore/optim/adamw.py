"""``GaLoreAdamW``: Adam on the low-rank gradient, torch.optim.AdamW on full-rank groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import GaLoreOptimizer
from .functional import adam_steps, adamw_full_rank_
from .validation import check_beta, check_non_negative

GALORE_GROUP_DOC = """
    Param groups with the key ``rank`` are projected (GaLore, arXiv:2403.03507);
    their optional keys are ``update_proj_gap`` (200), ``scale`` (0.25),
    ``proj_type`` ("std"), ``projector`` ("svd"), ``quant`` (None) and
    ``refresh`` ("fixed"). Groups without ``rank`` are updated at full rank.
    Weights with more than two dimensions are projected as their
    ``(shape[0], prod(shape[1:]))`` matrix.
"""


class GaLoreAdamW(GaLoreOptimizer):
    __doc__ = (
        """AdamW whose moments live in a rank-``r`` subspace of each projected weight's gradient.

    ``lr``, ``betas``, ``eps`` and ``weight_decay`` behave exactly as in
    ``torch.optim.AdamW``: eps is added after bias correction and weight decay
    is decoupled, ``W ← W·(1 − lr·wd)`` on the full weight before the update.
    galore-torch adds eps before bias correction (default 1e-6) and decays
    after the update, so the two agree exactly only with ``weight_decay=0``
    and gradients large against eps.
"""
        + GALORE_GROUP_DOC
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _validate_group(self, group):
        super()._validate_group(group)
        beta1, beta2 = group["betas"]
        check_beta("betas[0]", beta1)
        check_beta("betas[1]", beta2)
        check_non_negative("eps", group["eps"])

    def _init_moments(self, state, like, group):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def _lowrank_updates(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        updates = adam_steps(
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [float(s["step"]) for s in states],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
        )
        return updates, [lr] * len(updates)

    def _step_full_rank(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        adamw_full_rank_(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [float(s["step"]) for s in states],
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
