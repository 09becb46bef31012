"""``GaLoreAdafactor``: Adafactor (factored second moment) on the low-rank gradient."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ..declare import StateKey
from ..errors import GaLoreConfigError
from ..quant.int8 import weight_values
from .adamw import GALORE_GROUP_DOC, TORCH_FLAGS_DOC
from .base import GaLoreOptimizer
from .functional import adafactor_step, rms
from .members import register_base_optimizer
from .validation import check_beta, check_positive, torch_flags_from


@register_base_optimizer
class GaLoreAdafactor(GaLoreOptimizer):
    __doc__ = (
        """Adafactor (arXiv:1804.04235) whose statistics live in the projected subspace.

    Same arguments and semantics as ``transformers.optimization.Adafactor``
    (and galore-torch's GaLoreAdafactor): with ``relative_step=True`` the
    learning rate is ``min(1e-2, 1/sqrt(step))`` (or ``1e-6·step`` with
    ``warmup_init``), times ``max(eps[1], RMS(W))`` when ``scale_parameter``.
    Weight decay is decoupled, ``W ← W·(1 − lr·wd)``, with that learning rate.
    The relative-step scale uses the RMS of the full weight, as in
    galore-torch.
"""
        + TORCH_FLAGS_DOC
        + GALORE_GROUP_DOC
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        stochastic_rounding: bool = True,
        **torch_flags: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": eps,
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
            "stochastic_rounding": stochastic_rounding,
            **torch_flags_from(torch_flags, type(self).__name__),
        }
        super().__init__(params, defaults)

    def _validate_group(self, group):
        super()._validate_group(group)
        if group["lr"] is not None and group["relative_step"]:
            raise GaLoreConfigError(
                f"`lr`={group['lr']!r} cannot be combined with `relative_step=True`; "
                "pass `relative_step=False` to use a fixed learning rate"
            )
        if group["lr"] is None and not group["relative_step"]:
            raise GaLoreConfigError("`lr` is required when `relative_step=False`")
        if group["warmup_init"] and not group["relative_step"]:
            raise GaLoreConfigError("`warmup_init=True` requires `relative_step=True`")
        if group["beta1"] is not None:
            check_beta("beta1", group["beta1"])
        check_positive("clip_threshold", group["clip_threshold"])
        if len(group["eps"]) != 2:
            raise GaLoreConfigError(f"`eps` must be a pair (eps1, eps2), got {group['eps']!r}")

    name = "adafactor"
    # float32 statistics whatever the gradient's dtype; the factored second moment is neither
    # sharded nor rotated with the gradient
    state_keys: ClassVar[dict[str, StateKey]] = {
        "exp_avg": StateKey(torch.float32, follows_gradient=True, rotate="linear"),
        "exp_avg_sq": StateKey(torch.float32, follows_gradient=True, rotate="squared"),
        "exp_avg_sq_row": StateKey(torch.float32),
        "exp_avg_sq_col": StateKey(torch.float32),
    }
    _group_identity = ("relative_step", "clip_threshold", "decay_rate")

    @classmethod
    def state_layout(cls, like, group, state, *, dtype):
        shapes = {"exp_avg": like} if group.get("beta1") is not None else {}
        if len(like) >= 2:
            shapes["exp_avg_sq_row"] = like[:-1]
            shapes["exp_avg_sq_col"] = like[:-2] + like[-1:]
        else:
            shapes["exp_avg_sq"] = like
        return {key: cls._entry(key, shape, dtype) for key, shape in shapes.items()}

    def _init_moments(self, state, like, group):
        if "exp_avg_sq" in state or "exp_avg_sq_row" in state:
            return
        like = like.float()
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(like)
        if like.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(like.shape[:-1], dtype=like.dtype, device=like.device)
            state["exp_avg_sq_col"] = torch.zeros(
                like.shape[:-2] + like.shape[-1:], dtype=like.dtype, device=like.device
            )
        else:
            state["exp_avg_sq"] = torch.zeros_like(like)

    @staticmethod
    def _learning_rate(group: dict, step: float, param: torch.Tensor) -> float:
        lr = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr = max(group["eps"][1], float(rms(weight_values(param).float()))) * lr
        return float(lr)

    def _lowrank_updates(self, group, params, grads, states):
        updates, lrs = [], []
        for param, grad, state in zip(params, grads, states):
            step = float(state["step"])
            lr = self._learning_rate(group, step, param)
            update = adafactor_step(
                grad.float(),
                state,
                lr=lr,
                step=step,
                eps1=group["eps"][0],
                clip_threshold=group["clip_threshold"],
                decay_rate=group["decay_rate"],
                beta1=group["beta1"],
            )
            updates.append(update)
            lrs.append(lr)
        return updates, lrs
