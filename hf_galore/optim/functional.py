"""Pure tensor maths of the base updates (no ``self``, no dict lookups), testable alone.

Adam runs through torch's own fused AdamW kernel where it exists (CPU and
CUDA float tensors; identical to ``torch.optim.AdamW(fused=True)``), and
otherwise through a multi-tensor version that follows the operation order of
``torch.optim.AdamW(foreach=True)``; the two agree to float rounding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


def adam_moments_(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[float],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction: bool = True,
) -> tuple[list[torch.Tensor], list[float]]:
    """Advance Adam's moments in place; return the denominators and ``1 − β₁ᵗ``.

    ``denom = sqrt(v)/sqrt(1 − β₂ᵗ) + eps``: eps is added *after* bias
    correction, as in torch.optim.AdamW (galore-torch adds it before).
    ``bias_correction=False`` (galore-torch's ``correct_bias=False``) takes
    both corrections as 1: ``denom = sqrt(v) + eps``, step ``lr·m/denom``.
    """
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    bias_correction1 = [1.0 - beta1**s if bias_correction else 1.0 for s in steps]
    bias_correction2_sqrt = [math.sqrt(1.0 - beta2**s) if bias_correction else 1.0 for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    return denom, bias_correction1


@contextlib.contextmanager
def restored_where(found_inf: torch.Tensor | None, tensors: list[torch.Tensor]) -> Iterator[None]:
    """Where ``found_inf`` is 1, put ``tensors`` back as they were before the block (no host read).

    For updates whose kernel has no ``found_inf`` argument (bitsandbytes'
    8-bit Adam, Adafactor, the multi-tensor Adam): costs one copy of each
    tensor and one ``torch.where`` pass over it per step.
    """
    if found_inf is None or not tensors:
        yield
        return
    saved = [t.clone() for t in tensors]
    yield
    keep = found_inf.bool()
    for t, old in zip(tensors, saved):
        t.copy_(torch.where(keep.to(t.device), old, t))


def zero_where(found_inf: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` with every entry replaced by 0 where ``found_inf`` is 1 (no host read)."""
    keep = found_inf.bool()
    return [torch.where(keep.to(t.device), torch.zeros((), dtype=t.dtype, device=t.device), t) for t in tensors]


_FUSED_DEVICES = ("cpu", "cuda")


def fused_adamw_supports(tensors: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can run on ``tensors`` (one device, float dtype, contiguous).

    The kernel walks raw memory, so a strided view (e.g. a column slice)
    would be read wrongly: such tensors take the multi-tensor path.

    The fused kernel makes one pass over memory instead of about seven: on CPU
    it is ~7x faster than the multi-tensor path for large tensors.
    """
    if not hasattr(torch, "_fused_adamw_") or not tensors:
        return False
    first = tensors[0]
    return (
        first.device.type in _FUSED_DEVICES
        and first.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        and all(t.device == first.device and t.dtype == first.dtype and t.is_contiguous() for t in tensors)
    )


def _fused_adamw_(
    params, grads, exp_avgs, exp_avg_sqs, step_tensors, *, lr, beta1, beta2, eps, weight_decay, found_inf=None
):
    """torch's fused AdamW kernel; where ``found_inf`` is 1 it writes nothing (GradScaler's skipped step)."""
    torch._fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        step_tensors,
        amsgrad=False,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
        grad_scale=None,
        found_inf=found_inf,
    )


def adam_steps_fused(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step_tensors: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    found_inf: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """:func:`adam_steps` through torch's fused AdamW kernel (see :func:`fused_adamw_supports`).

    The kernel updates a "parameter" in place; starting from zeros it leaves
    ``−lr·m̂/(√v̂ + eps)``, which we negate. With ``found_inf`` set the moments
    are untouched and the steps stay zero.
    """
    buffers = [torch.zeros_like(g, memory_format=torch.contiguous_format) for g in grads]
    _fused_adamw_(
        buffers,
        grads,
        exp_avgs,
        exp_avg_sqs,
        step_tensors,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=0.0,
        found_inf=found_inf,
    )
    torch._foreach_neg_(buffers)
    return buffers


def adam_steps(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction: bool = True,
) -> list[torch.Tensor]:
    """Adam steps ``lr · m̂ / (sqrt(v̂) + eps)`` (to be subtracted), moments advanced in place."""
    denom, bias_correction1 = adam_moments_(
        grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2, eps=eps, bias_correction=bias_correction
    )
    updates = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(updates, [lr / bc for bc in bias_correction1])
    return updates


def adamw_full_rank_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool = True,
) -> None:
    """torch.optim.AdamW (amsgrad off, multi-tensor path) on full-rank tensors, in place."""
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    denom, bias_correction1 = adam_moments_(
        grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2, eps=eps, bias_correction=bias_correction
    )
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-(lr / bc) for bc in bias_correction1])


def adamw_full_rank_fused_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step_tensors: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    found_inf: torch.Tensor | None = None,
) -> None:
    """``torch.optim.AdamW(fused=True)`` on full-rank tensors, in place (steps already incremented).

    Where ``found_inf`` is 1 nothing is written (the caller takes the step increment back).
    """
    _fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        step_tensors,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        found_inf=found_inf,
    )


def adafactor_step(
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    step: float,
    eps1: float,
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
) -> torch.Tensor:
    """One Adafactor step (Shazeer & Stern 2018) with ``lr`` included, moments updated in ``state``.

    Mirrors transformers' ``Adafactor`` (the base of galore-torch's
    GaLoreAdafactor): factored second moment for matrices, RMS clipping of
    the update, optional first moment applied after the clipping.
    """
    beta2t = 1.0 - math.pow(step, decay_rate)
    update = grad.square().add_(eps1)
    if "exp_avg_sq_row" in state:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        update = torch.mul(r_factor, c_factor).mul_(grad)
    else:
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
        update = exp_avg_sq.rsqrt().mul_(grad)
    update.div_((rms(update) / clip_threshold).clamp_(min=1.0))
    update.mul_(lr)
    if beta1 is not None:
        exp_avg = state["exp_avg"]
        exp_avg.mul_(beta1).add_(update, alpha=1.0 - beta1)
        update = exp_avg.clone()
    return update


def rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)
