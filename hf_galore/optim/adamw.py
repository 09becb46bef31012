"""``GaLoreAdamW``: Adam on the low-rank gradient, torch.optim.AdamW on full-rank groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ..declare import StateKey
from ..errors import GaLoreConfigError
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
from .validation import BASE_TORCH_FLAGS, check_beta, check_bool, check_non_negative, torch_flags_from

TORCH_FLAGS_DOC = """
    Also takes torch.optim's flags as keywords (``maximize``, ``foreach``,
    ``fused``, ``capturable``, ``differentiable``, ``amsgrad``,
    ``decoupled_weight_decay``, torch's defaults), in every group: each is
    honoured or refused by name (docs/optimizers.md, "torch.optim's flags").
"""

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

    galore-torch's (and transformers' old ``AdamW``'s) ``correct_bias=False``
    drops Adam's bias correction (BERT's recipe), and ``no_deprecation_warning``
    is accepted (hf_galore emits no deprecation warning).
"""
        + TORCH_FLAGS_DOC
        + GALORE_GROUP_DOC
    )

    # torch's fused AdamW kernel skips a flagged step in place; other buckets are snapshot and restored
    _native_found_inf = True
    # torch's fused kernel (fused=True) and the multi-tensor one (foreach=True), one tensor at a time
    # (foreach=False); by default the fused kernel wherever it runs
    torch_flags: ClassVar[dict] = {
        **BASE_TORCH_FLAGS,
        "foreach": ((None, True, False), ""),
        "fused": ((None, True, False), ""),
    }
    supports_complex = True
    _constructor_only = ("no_deprecation_warning",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        stochastic_rounding: bool = True,
        *,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        **torch_flags: Any,
    ) -> None:
        check_bool("no_deprecation_warning", no_deprecation_warning)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "stochastic_rounding": stochastic_rounding,
            "correct_bias": correct_bias,
            **self._extra_defaults(),
            **torch_flags_from(torch_flags, type(self).__name__),
        }
        super().__init__(params, defaults)

    def _extra_defaults(self) -> dict[str, Any]:
        """Hyper-parameters a subclass adds to every group (set before the groups are checked)."""
        return {}

    def _validate_group(self, group):
        super()._validate_group(group)
        if group["lr"] is None:
            raise GaLoreConfigError(f"`lr` must be a number >= 0 for {type(self).__name__}, got None")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise GaLoreConfigError(f"`betas` must be a pair (beta1, beta2), got {betas!r}")
        check_beta("betas[0]", betas[0])
        check_beta("betas[1]", betas[1])
        check_non_negative("eps", group["eps"])
        check_bool("correct_bias", group.get("correct_bias", True))
        if group.get("fused"):
            if not group.get("correct_bias", True):
                raise GaLoreConfigError(
                    "`fused`=True cannot be combined with `correct_bias`=False: torch's fused AdamW kernel always "
                    "corrects the bias. Leave `fused` unset"
                )
            _check_fused_supported(group["params"])

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
        beta1, beta2 = betas_of(group)
        lr = float(group["lr"])
        hp = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": group["eps"]}
        bias_correction = group.get("correct_bias", True)
        updates: list[torch.Tensor] = [None] * len(grads)  # type: ignore[list-item]
        for indices in _buckets(grads, group):
            g = [grads[i].contiguous() for i in indices]  # the fused kernel reads raw memory
            m = [states[i]["exp_avg"] for i in indices]
            v = [states[i]["exp_avg_sq"] for i in indices]
            if _fused(group, g + m + v):
                out = adam_steps_fused(g, m, v, [states[i]["step"] for i in indices], found_inf=found_inf, **hp)
            else:
                with restored_where(found_inf, m + v):
                    steps = [float(states[i]["step"]) for i in indices]
                    out = adam_steps(g, m, v, steps, bias_correction=bias_correction, **hp)
                if found_inf is not None:  # the fused kernel leaves its zero steps; here they are NaN
                    out = zero_where(found_inf, out)
            for i, u in zip(indices, out):
                updates[i] = u
        return updates, [lr] * len(updates)

    def _step_full_rank(self, group, params, grads, states, found_inf=None):
        beta1, beta2 = betas_of(group)
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
        bias_correction = group.get("correct_bias", True)
        for indices in _buckets(params, group):
            p = [params[i] for i in indices]
            g = [grads[i].contiguous() for i in indices]  # the fused kernel reads raw memory
            m = [states[i]["exp_avg"] for i in indices]
            v = [states[i]["exp_avg_sq"] for i in indices]
            if _fused(group, p + g + m + v):
                adamw_full_rank_fused_(p, g, m, v, [states[i]["step"] for i in indices], found_inf=found_inf, **hp)
            else:
                with restored_where(found_inf, p + m + v):
                    steps = [float(states[i]["step"]) for i in indices]
                    adamw_full_rank_(p, g, m, v, steps, bias_correction=bias_correction, **hp)

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
            if not _fused(group, [grad, m, v]):
                with restored_where(found_inf, [m, v]):
                    bias_correction = group.get("correct_bias", True)
                    (step,) = adam_steps(
                        [grad], [m], [v], [float(state["step"])], bias_correction=bias_correction, **hp
                    )
                if found_inf is not None:
                    (step,) = zero_where(found_inf, [step])
                add_rounded_(param, step, alpha=-1.0, decay=decay, key=key)
                continue
            flat_g, flat_m, flat_v = grad.view(-1), m.view(-1), v.view(-1)
            buffer = scratch(grad.device, grad.dtype, min(block_elements(grad.device), grad.numel()), slot=1)

            def fill(master, start, stop, state=state, flat_g=flat_g, flat_m=flat_m, flat_v=flat_v, buffer=buffer):
                step = buffer[: stop - start].zero_()
                fused_adamw_(
                    [step],
                    [flat_g[start:stop]],
                    [flat_m[start:stop]],
                    [flat_v[start:stop]],
                    [state["step"]],
                    weight_decay=0.0,
                    found_inf=found_inf,
                    **hp,
                )
                if decay is not None:
                    master.mul_(decay)
                master.add_(step)

            write_rounded_(param, fill, key)


def betas_of(group: dict) -> tuple[float, float]:
    """The group's ``betas`` as floats (torch.optim accepts one-element tensors too)."""
    beta1, beta2 = group["betas"]
    return float(beta1), float(beta2)


def _fused(group: dict, tensors: list[torch.Tensor]) -> bool:
    """Whether this bucket runs torch's fused kernel: by default wherever it can, never with ``fused=False``,
    ``foreach=True`` (the multi-tensor kernel) or ``correct_bias=False`` (the kernel always corrects)."""
    if group.get("fused") is False or group.get("foreach") or not group.get("correct_bias", True):
        return False
    return fused_adamw_supports(tensors)


def _buckets(tensors: list[torch.Tensor], group: dict) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), the unit multi-tensor kernels work on; one tensor
    per bucket with ``foreach=False`` (torch's single-tensor implementation, the same maths)."""
    if group.get("foreach") is False:
        return [[i] for i in range(len(tensors))]
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return list(buckets.values())


#: dtypes and devices torch's fused AdamW kernel runs on (what ``fused=True`` requires)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FUSED_DEVICE_TYPES = ("cpu", "cuda")


def _check_fused_supported(params: list[torch.Tensor]) -> None:
    """``fused=True``: refuse parameters torch's fused kernel cannot run on, as torch.optim.AdamW does."""
    for p in params:
        if p.is_complex() or p.dtype not in _FUSED_DTYPES or p.device.type not in _FUSED_DEVICE_TYPES:
            raise GaLoreConfigError(
                f"`fused`=True needs floating-point parameters on {', '.join(_FUSED_DEVICE_TYPES)} for torch's "
                f"fused AdamW kernel; got one of dtype {p.dtype} on {p.device}. Leave `fused` unset"
            )
