"""``GaLoreAdamW``: Adam on the low-rank gradient, torch.optim.AdamW on full-rank groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ..declare import StateKey
from ..quant.rounding import add_rounded_, block_elements, scratch, write_rounded_
from .base import GaLoreOptimizer
from .functional import _fused_adamw_ as fused_adamw_
from .functional import (
    adam_steps,
    adam_steps_fused,
    adamw_full_rank_,
    adamw_full_rank_fused_,
    fused_adamw_supports,
    restored_where,
    zero_where,
)
from .members import register_base_optimizer
from .validation import check_beta, check_non_negative

GALORE_GROUP_DOC = """
    Param groups with the key ``rank`` are projected (GaLore, arXiv:2403.03507);
    their optional keys are ``update_proj_gap`` (200), ``scale`` (0.25),
    ``proj_type`` ("std"), ``projector`` ("auto" | "svd" | "randomized" | "online_pca"),
    ``quant`` (None | "int8" | "int4"), ``refresh`` ("fixed" | "staggered" |
    "lazy"), ``rotate_moments`` (False) and the member options listed in
    docs/optimizers.md (``oversample``, ``power_iters``, ``osd_alpha``, ...).
    Groups without ``rank`` are updated at full rank. Weights with more than
    two dimensions are projected as their ``(shape[0], prod(shape[1:]))`` matrix.
"""


@register_base_optimizer
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

    # torch's fused AdamW kernel skips a flagged step in place; other buckets are snapshot and restored
    _native_found_inf = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "stochastic_rounding": stochastic_rounding,
        }
        super().__init__(params, defaults)

    def _validate_group(self, group):
        super()._validate_group(group)
        beta1, beta2 = group["betas"]
        check_beta("betas[0]", beta1)
        check_beta("betas[1]", beta2)
        check_non_negative("eps", group["eps"])

    name = "adamw"
    state_keys: ClassVar[dict[str, StateKey]] = {
        "exp_avg": StateKey(follows_gradient=True, rotate="linear"),
        "exp_avg_sq": StateKey(follows_gradient=True, rotate="squared"),
    }
    _group_identity = ("betas",)

    @classmethod
    def state_layout(cls, like, group, state, *, dtype):
        return {key: cls._entry(key, like, dtype) for key in ("exp_avg", "exp_avg_sq")}

    def _init_moments(self, state, like, group):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def _lowrank_updates(self, group, params, grads, states, found_inf=None):
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        hp = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": group["eps"]}
        updates: list[torch.Tensor] = [None] * len(grads)  # type: ignore[list-item]
        for indices in _by_device_and_dtype(grads):
            g = [grads[i].contiguous() for i in indices]  # the fused kernel reads raw memory
            m = [states[i]["exp_avg"] for i in indices]
            v = [states[i]["exp_avg_sq"] for i in indices]
            if fused_adamw_supports(g + m + v):
                out = adam_steps_fused(g, m, v, [states[i]["step"] for i in indices], found_inf=found_inf, **hp)
            else:
                with restored_where(found_inf, m + v):
                    out = adam_steps(g, m, v, [float(states[i]["step"]) for i in indices], **hp)
                if found_inf is not None:  # the fused kernel leaves its zero steps; here they are NaN
                    out = zero_where(found_inf, out)
            for i, u in zip(indices, out):
                updates[i] = u
        return updates, [lr] * len(updates)

    def _step_full_rank(self, group, params, grads, states, found_inf=None):
        beta1, beta2 = group["betas"]
        hp = {
            "lr": float(group["lr"]),
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
        }
        rounded = [i for i, (p, s) in enumerate(zip(params, states)) if self._rounding_key(p, group, s) is not None]
        if rounded:
            self._step_full_rank_rounded(group, params, grads, states, rounded, hp, found_inf)
            taken = set(rounded)
            keep = [i for i in range(len(params)) if i not in taken]
            params, grads, states = [params[i] for i in keep], [grads[i] for i in keep], [states[i] for i in keep]
        for indices in _by_device_and_dtype(params):
            p = [params[i] for i in indices]
            g = [grads[i].contiguous() for i in indices]  # the fused kernel reads raw memory
            m = [states[i]["exp_avg"] for i in indices]
            v = [states[i]["exp_avg_sq"] for i in indices]
            if fused_adamw_supports(p + g + m + v):
                adamw_full_rank_fused_(p, g, m, v, [states[i]["step"] for i in indices], found_inf=found_inf, **hp)
            else:
                with restored_where(found_inf, p + m + v):
                    adamw_full_rank_(p, g, m, v, [float(states[i]["step"]) for i in indices], **hp)

    def _step_full_rank_rounded(self, group, params, grads, states, indices, hp, found_inf=None):
        """bf16 / fp16 weights with stochastic rounding: Adam's step in blocks, then a rounded write.

        torch's fused kernel writes its parameter in the parameter's dtype, so
        per block (``block_elements``) it runs on a zeroed buffer (leaving
        ``−lr·m̂/(√v̂ + eps)``) and the block is rounded from
        ``W·(1 − lr·wd) + buffer`` computed in float32; blocks keep the
        temporaries small (a whole-weight buffer costs more than the kernel).
        Under ``found_inf`` the kernel skips, the step stays zero and the decay
        is exactly 1, so the rounded write gives the weight back unchanged.
        """
        hp = dict(hp)
        wd = hp.pop("weight_decay")
        decay = 1.0 - hp["lr"] * wd if wd else None
        if decay is not None and found_inf is not None:
            decay = torch.where(found_inf.bool(), 1.0, torch.tensor(decay, dtype=torch.float32))
        for i in indices:
            param, grad, state = params[i], grads[i].contiguous(), states[i]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            key = self._rounding_key(param, group, state)
            if not fused_adamw_supports([grad, m, v]):
                with restored_where(found_inf, [m, v]):
                    (step,) = adam_steps([grad], [m], [v], [float(state["step"])], **hp)
                if found_inf is not None:
                    (step,) = zero_where(found_inf, [step])
                add_rounded_(param, step, alpha=-1.0, decay=decay, key=key)
                continue
            flat_g, flat_m, flat_v = grad.view(-1), m.view(-1), v.view(-1)
            buffer = scratch(grad.device, grad.dtype, min(block_elements(grad.device), grad.numel()), slot=1)

            def fill(master, start, stop, state=state, flat_g=flat_g, flat_m=flat_m, flat_v=flat_v, buffer=buffer):
                step = buffer[: stop - start].zero_()
                fused_adamw_(
                    [step], [flat_g[start:stop]], [flat_m[start:stop]], [flat_v[start:stop]], [state["step"]],
                    weight_decay=0.0, found_inf=found_inf, **hp,
                )
                if decay is not None:
                    master.mul_(decay)
                master.add_(step)

            write_rounded_(param, fill, key)


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), the unit multi-tensor kernels work on."""
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return list(buckets.values())
