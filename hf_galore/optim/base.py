"""``GaLoreOptimizer``: the loop, the projection and the state layout shared by every member.

Subclasses add only their base update (Adam, 8-bit Adam, Adafactor) through
three methods: :meth:`_init_moments`, :meth:`_lowrank_updates` and
:meth:`_step_full_rank`. A param group with the key ``rank`` is low-rank
(galore-torch's convention); any other group is a plain full-rank group.

Low-rank step for weight ``W`` with gradient ``G`` (2-D view, see
``as_matrix``):  ``R = project(G)``; ``U, lr_wd = base_update(R)``;
``W ← W·(1 − lr_wd·wd)``; ``W ← W − scale·back(U)``.

Non-finite gradients (group key ``skip_nonfinite``, on by default): a step
whose gradients hold a NaN/Inf leaves weights and every state tensor as they
were, GradScaler-style. The decision is a found-inf flag *tensor*, applied
with ``found_inf`` of torch's fused AdamW kernel or ``torch.where`` selection,
so the normal path never reads it on the host (see :func:`nonfinite_flag`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from ..declare import StateKey, StateTensor, layout_bytes
from ..errors import GaLoreConfigError, UnsupportedSetupError
from ..projectors import get_projector
from ..projectors.randomized import derive_seed
from ..quant.int8 import int8_owner
from ..quant.rounding import SR_DTYPES, add_rounded_
from . import accumulation, engines, lowrank, state_checks
from .functional import restored_where, zero_where
from .stats import RefreshStats
from .validation import (
    BASE_TORCH_FLAGS,
    GROUP_DEFAULTS,
    ROUNDING_DEFAULTS,
    TORCH_FLAG_DEFAULTS,
    check_choice,
    check_full_rank_group_keys,
    check_group_keys,
    check_lowrank_keys,
    check_non_negative,
    check_rounding_keys,
    check_torch_flags,
    lowrank_defaults,
)

#: parameter -> ``weakref.ref`` of the optimizer that last took it. A layer-wise optimizer's gradient
#: hooks act only while it is the owner, so a newer optimizer on the same model (or a dropped one)
#: never has the old hooks update its weights. Keyed by identity and held weakly on both sides: the
#: registry keeps neither parameters nor optimizers alive, and parameters carry no attribute (a
#: weakref attribute would make ``torch.save(model)`` fail to pickle).
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def param_owner(param: torch.Tensor) -> Any:
    """The optimizer that last took ``param`` (``None`` when none did, or it was garbage-collected)."""
    ref = _OWNERS.get(param)
    return None if ref is None else ref()


def claim_params(params: Iterable[torch.Tensor], owner: Any) -> None:
    """Record ``owner`` as the optimizer now driving ``params`` (held weakly)."""
    ref = weakref.ref(owner)
    for p in params:
        _OWNERS[p] = ref


def release_params(params: Iterable[torch.Tensor], owner: Any) -> None:
    """Forget ``owner`` for those of ``params`` it still owns."""
    for p in params:
        if param_owner(p) is owner:
            del _OWNERS[p]


def nonfinite_flag(tensors: list[torch.Tensor], *, across_ranks: bool = False) -> torch.Tensor | None:
    """A float32 0-dim tensor, 1.0 when any of ``tensors`` holds a NaN or an Inf (``None`` for no tensors).

    One read of each tensor with the cheapest reduction that answers the
    question for its dtype (:func:`_reduce`): float32, float64 and bf16 are
    flagged for a NaN/Inf and also when their sum of squares overflows
    (an L2 norm beyond ~1.8e19: Adam's second moment of such a gradient is
    already infinite, and the weight would never move again); fp16 only for a
    NaN/Inf (its values can never overflow a float32 sum, while a plain fp16
    sum overflows at 65504 and would skip every step of a large gradient).
    Nothing is read on the host. Sharded (FSDP2 ``DTensor``) tensors, or
    ``across_ranks``, take the maximum over the process group so that every
    rank skips the same steps.
    """
    flag = None
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    sharded = False
    for t in tensors:
        if type(t) is not torch.Tensor and hasattr(t, "to_local"):  # FSDP2 DTensor: check this rank's shard
            t, sharded = t.to_local(), True
        by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        found = torch.stack([_reduce(t).float() for t in group]).isfinite().all().logical_not()
        flag = found if flag is None else flag.logical_or(found.to(flag.device))
    if flag is None:
        return None
    flag = flag.float()
    if (sharded or across_ranks) and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # every rank skips together
    return flag


def _reduce(t: torch.Tensor) -> torch.Tensor:
    """A scalar that is NaN/Inf exactly when ``t`` is flagged (see :func:`nonfinite_flag`), without temporaries.

    Measured on a 4096×11008 tensor, one CPU thread: ``dot`` (BLAS) 18 ms
    float32; ``vector_norm`` 11 ms bf16 (float32 accumulation inside, so it
    overflows where a float32 sum of squares does); ``aminmax`` 12 ms fp16
    (exact; ``vector_norm(dtype=float32)`` and ``sum(dtype=float32)`` copy the
    tensor to float32 first: 210 ms).
    """
    if not t.numel():
        return t.new_zeros((), dtype=torch.float32)
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous():
        t = t.t()  # the same values; a transposed gradient reduces at contiguous speed
    if t.dtype == torch.float16:
        low, high = torch.aminmax(t)
        return low.float() + high.float()
    if t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        flat = t.view(-1)
        return torch.dot(flat, flat)
    if t.is_floating_point():
        return torch.linalg.vector_norm(t)
    return t.sum()


def _host_flag(found_inf: torch.Tensor) -> torch.Tensor:
    """The flag on the CPU, where the step counters live (a device-to-host read off the CPU)."""
    return found_inf if found_inf.device.type == "cpu" else found_inf.to("cpu")


def _state_tensors(state: dict[str, Any], skip: tuple[str, ...] = ("step",)) -> list[str]:
    """Keys of the tensors in ``state`` except those equal to, or starting with, an entry of ``skip``."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith(skip)]


class GaLoreOptimizer(Optimizer):
    """Base class: do not instantiate; use ``GaLoreAdamW`` and friends."""

    #: ``basis -> basis`` applied to every new basis before it is stored, so data-parallel ranks
    #: share one basis: chosen by the engines at the first low-rank step (the DDP engine's broadcast
    #: when a DDP module wraps the weights), or set by ``hf_galore.distributed.synchronize_bases``
    basis_sync = None
    #: whether :attr:`basis_sync` is settled (no engine is asked again)
    basis_sync_decided = False

    #: ``torch.amp.GradScaler`` then hands ``step()`` its ``grad_scale`` and ``found_inf`` (as
    #: attributes, as for torch's fused AdamW) instead of reading ``found_inf`` on the host itself
    _step_supports_amp_scaling = True

    #: the member's base updates take ``found_inf=`` themselves (torch's fused AdamW kernel skips in
    #: place); otherwise their state tensors are snapshot and restored with ``torch.where``
    _native_found_inf = False

    #: torch.optim's flags: ``flag -> (values honoured, why another value cannot be)``, checked for
    #: every group (``validation.check_torch_flags``); ``maximize`` is honoured here for every member
    torch_flags: ClassVar[Mapping[str, tuple[tuple[object, ...], str]]] = BASE_TORCH_FLAGS
    #: complex parameters in full-rank groups are updated as their real view (as torch.optim.AdamW does)
    supports_complex: ClassVar[bool] = False

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.galore_stats = RefreshStats()
        self._param_index: dict[torch.Tensor, int] = {}
        #: weight -> its projected gradients of the current accumulation window (optim/accumulation.py)
        self._pending: dict[torch.Tensor, accumulation.Accumulated] = {}
        self._accumulation_handles: list[Any] = []
        super().__init__(params, {**ROUNDING_DEFAULTS, **TORCH_FLAG_DEFAULTS, **defaults})
        weakref.finalize(self, remove_hook_handles, self._accumulation_handles)
        # sharded engines (FSDP2): low-rank shards appear as DTensors in state_dict() so that
        # torch.distributed.checkpoint saves every rank's part (no-ops otherwise)
        self.register_state_dict_post_hook(engines.state_dict_post_hook)
        self.register_load_state_dict_pre_hook(engines.load_state_dict_pre_hook)

    #: instance attributes a copy or pickle keeps beside torch's ``defaults``, ``state`` and ``param_groups``
    _PICKLED = ("basis_sync", "basis_sync_decided")

    def __getstate__(self) -> dict[str, Any]:
        """torch's three entries plus the basis-sync decision (``synchronize_bases(opt, enabled=False)``)."""
        state = super().__getstate__()
        for key in self._PICKLED:
            if key in self.__dict__:
                state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A deep-copied or unpickled optimizer gets fresh counters and its FSDP2 state_dict hooks back.

        ``torch.optim.Optimizer`` pickles only ``defaults``, ``state`` and
        ``param_groups``; without this the copy failed at its first ``step()``
        (no ``galore_stats``) and lost the sharded-checkpoint hooks.
        """
        super().__setstate__(state)
        self.__dict__.setdefault("galore_stats", RefreshStats())
        self.__dict__.setdefault("_param_index", {})
        if "_pending" not in self.__dict__:  # a copy: its parameters get their own accumulation hooks
            self._pending = {}
            self._accumulation_handles = []
            weakref.finalize(self, remove_hook_handles, self._accumulation_handles)
            for group in self.param_groups:
                claim_params(group["params"], self)  # the copy drives its own (copied) parameters
                self._hook_accumulation(group)
        if engines.state_dict_post_hook not in self._optimizer_state_dict_post_hooks.values():
            self.register_state_dict_post_hook(engines.state_dict_post_hook)
        if engines.load_state_dict_pre_hook not in self._optimizer_load_state_dict_pre_hooks.values():
            self.register_load_state_dict_pre_hook(engines.load_state_dict_pre_hook)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and "rank" in param_group:  # the keys as written, before defaults
            check_group_keys(param_group, self.defaults)
        elif isinstance(param_group, dict):
            check_full_rank_group_keys(param_group, self.defaults)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key, value in GROUP_DEFAULTS.items():
            group.setdefault(key, value)
        check_choice("skip_nonfinite", group["skip_nonfinite"], (True, False))
        self._validate_group(group)
        if "rank" in group:
            self._complete_lowrank_group(group)
            self._hook_accumulation(group)
        elif any(int8_owner(p) is not None for p in group["params"]):
            raise GaLoreConfigError(
                "an INT8 weight (`Int8Linear.weight`, see `prepare_model_for_int8_weights`) is in a group "
                "without `rank`; its updates are applied with stochastic rounding by the low-rank path only. "
                "Put it in a low-rank group, or lower `rank` below its smaller dimension"
            )
        elif not self.supports_complex and any(p.is_complex() for p in group["params"]):
            shape = next(tuple(p.shape) for p in group["params"] if p.is_complex())
            raise GaLoreConfigError(
                f"a complex parameter of shape {shape} is in a param group of {type(self).__name__}, which "
                "updates real tensors only; use GaLoreAdamW (it updates complex parameters as their real "
                "view, as torch.optim.AdamW does) or pass `torch.view_as_real(param)` as the parameter"
            )
        claim_params(group["params"], self)

    @staticmethod
    def _complete_lowrank_group(group: dict[str, Any]) -> None:
        """Fill a group's missing low-rank keys with their defaults and check it (at construction, or when
        ``rank`` was added to a full-rank group during training)."""
        for key, value in lowrank_defaults().items():
            group.setdefault(key, value)
        check_lowrank_keys(group)
        for p in group["params"]:
            if p.dim() < 2:
                raise GaLoreConfigError(
                    f"a parameter of shape {tuple(p.shape)} is in a low-rank group (`rank`="
                    f"{group['rank']!r}); projection needs a weight with >= 2 dimensions. "
                    "Put biases, norms and other 1-D tensors in a group without `rank`."
                )
            if not p.is_floating_point():
                raise GaLoreConfigError(
                    f"a parameter of dtype {p.dtype} is in a low-rank group; only floating-point "
                    "weights can be projected"
                )

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Per-member hyper-parameter checks; the base checks what all share."""
        if group.get("lr") is not None:
            check_non_negative("lr", float(group["lr"]))
        check_non_negative("weight_decay", group.get("weight_decay", 0.0))
        check_rounding_keys(group)
        check_torch_flags(group, self.torch_flags, type(self).__name__)

    # ------------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load; moments that follow the gradient's dtype take the parameter's, every other entry keeps its own.

        ``torch.optim.Optimizer`` casts every floating state tensor to its
        parameter's dtype. For moments declared without a dtype (they follow
        the gradient) that is what torch.optim.AdamW does, so resuming an fp32
        run in bf16 (or the reverse) works; quantized bases, 8-bit moments and
        float32 statistics get their saved dtype back (lossless: the saved
        tensors are the source).

        State that would not fit its group after loading (other settings,
        another model or parameter order, another optimizer, galore-torch or
        a full-rank optimizer's moments in a low-rank group, FSDP2 shards in an
        unsharded optimizer) is refused with ``StateMismatchError``, and a
        group whose ``rank``, ``proj_type`` or ``quant`` differs from the
        checkpoint's with ``GaLoreConfigError``, before anything changes. A
        basis holding NaN/Inf is dropped and recomputed at the next step
        (``galore_stats.dropped_bases``); a weight whose moments hold NaN/Inf
        starts again as a new weight (``galore_stats.state_resets``); both warned.
        """
        state_checks.check_loadable(self, state_dict)
        self._drop_pending("load_state_dict()")
        follows = {key for key, spec in type(self).state_keys.items() if spec.dtype is None}
        built = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        super().load_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        for group, saved_group, own in zip(self.param_groups, saved_groups, built):
            for key, value in own.items():  # checkpoints from before a hyper-parameter existed
                group.setdefault(key, value)
            for key, value in GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            if "rank" in group:  # ... or a group key
                for key, value in lowrank_defaults().items():
                    group.setdefault(key, value)
            for param, param_id in zip(group["params"], saved_group["params"]):
                saved = state_dict["state"].get(param_id)
                if saved is None:
                    continue
                live = self.state[param]
                for key, value in saved.items():
                    if not isinstance(value, torch.Tensor) or live[key].dtype == value.dtype:
                        continue
                    if key in follows and live[key].dtype == param.dtype:
                        continue  # torch's cast to the parameter's dtype, as torch.optim.AdamW resumes
                    live[key] = value.to(device=param.device if key != "step" else value.device, copy=True)
                if isinstance(live.get("step"), (int, float)):  # torch < 1.12 and galore-torch save an int
                    live["step"] = torch.tensor(float(live["step"]), dtype=torch.float32)
        reset = state_checks.reset_nonfinite_moments(self)
        if reset:
            self.galore_stats.state_resets += reset
            self.galore_stats.warn_once(
                "nonfinite_loaded_moments",
                f"GaLore: the loaded optimizer state of {reset} weight(s) holds NaN/Inf moments; they start "
                "again as new weights (moments and step from zero; counted in galore_stats.state_resets)",
            )
        dropped = state_checks.drop_nonfinite_bases(self)
        if dropped:
            self.galore_stats.dropped_bases += dropped
            self.galore_stats.warn_once(
                "nonfinite_loaded_basis",
                f"GaLore: {dropped} basis/bases in the loaded state hold NaN/Inf; dropped them, new ones are "
                "computed at the next step (counted in galore_stats.dropped_bases)",
            )

    def _refit_state(
        self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any], dtype: torch.dtype
    ) -> None:
        """Make ``param``'s state fit ``group`` and a gradient of ``dtype`` before it reaches a kernel.

        Shapes and dtypes only, no device sync. A state whose shapes no longer
        fit (``rank`` / ``proj_type`` changed mid-run, ``rank`` added or
        removed, or the weight's data replaced by one of another shape) is
        re-made as that of a new weight: basis computed at this step, moments
        and ``step`` from zero (so Adam's bias correction and the refresh
        schedule restart); warned once, counted in ``galore_stats.state_resets``.
        Moments that follow the gradient's dtype but hold another one (the
        model cast with ``model.to(torch.bfloat16)`` after the optimizer was
        built) are cast to it, warned once: torch.optim.AdamW would fail there.
        """
        if "step" not in state or lowrank.is_sharded(param):
            return
        layout = self.state_layout(state_checks.moment_like(param, group), group, state, dtype=dtype)
        mismatch = state_checks.find_mismatch(self, param, state, group, layout)
        if mismatch is None:
            cast = state_checks.conform_dtypes(state, layout)
            if cast:
                self.galore_stats.warn_once(
                    "state_cast",
                    f"GaLore: optimizer state of a weight of shape {tuple(param.shape)} was {cast[0][1]} while its "
                    f"gradient is {dtype}; cast {', '.join(f'`{key}`' for key, _ in cast)} to {dtype} (the model's "
                    "dtype changed after the optimizer was built or loaded)",
                )
            return
        state.clear()
        self.galore_stats.state_resets += 1
        index = next((i for i, g in enumerate(self.param_groups) if g is group), "?")
        self.galore_stats.warn_once(
            "state_remade",
            f"GaLore: the state of a weight of shape {tuple(param.shape)} in param group {index} no longer fits "
            f"the group ({state_checks.describe(mismatch, group)}); re-made it: new basis now, moments and step "
            "from zero. Expected after changing `rank` or `proj_type` during training (docs/optimizers.md) or "
            "replacing a weight's data by one of another shape; counted in galore_stats.state_resets",
        )

    def _state_for(self, param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state

    # ------------------------------------------------------------- accumulation
    def _group_of(self, param: torch.Tensor) -> dict[str, Any] | None:
        """The param group holding ``param`` (``None`` for a parameter this optimizer does not train)."""
        cache = self.__dict__.setdefault("_group_cache", {})
        group = cache.get(param)
        if group is not None and any(p is param for p in group["params"]):
            return group
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                cache[param] = group
                return group
        return None

    @torch.no_grad()
    def accumulate_gradient(self, param: torch.Tensor) -> bool:
        """Fold ``param.grad`` into its subspace accumulator and free it, where this step allows it.

        ``True`` when the gradient was projected and ``param.grad`` is now
        ``None``; ``False`` when it stays as it is: a full-rank weight, no
        basis yet, a refresh due at this step, a finder that tracks every step
        (see :mod:`hf_galore.optim.accumulation`). The next ``step()`` uses
        the accumulated ``R``; ``zero_grad()`` discards it.
        """
        if param.grad is None:
            return False
        group = self._group_of(param)
        if group is None or "rank" not in group or "update_proj_gap" not in group:
            return False
        state = self.state.get(param)
        if not state:
            return False
        self._refit_state(param, state, group, param.grad.dtype)
        return accumulation.absorb(self._pending, param, group, state)

    def pending_gradient(self, param: torch.Tensor) -> accumulation.Accumulated | None:
        """``param``'s projected gradients of the current accumulation window, if it accumulates in the subspace."""
        return self._pending.get(param)

    def _hook_accumulation(self, group: dict[str, Any]) -> None:
        """``accumulate="lowrank"`` in regular mode: every gradient is projected and freed in its hook."""
        if group.get("accumulate") != "lowrank":
            return
        hook = accumulation.gradient_hook(weakref.ref(self), param_owner)
        for p in group["params"]:
            if p.requires_grad:
                self._accumulation_handles.append(p.register_post_accumulate_grad_hook(hook))

    def _drop_pending(self, why: str) -> None:
        if self._pending:
            count = len(self._pending)
            self._pending.clear()
            self.galore_stats.warn_once(
                "pending_dropped",
                f"GaLore: {why} in the middle of an accumulation window discarded the gradients of {count} "
                "weight(s) accumulated in their subspace (as it would discard their `.grad`)",
            )

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; gradients accumulated in the subspace are not in it (like ``.grad``)."""
        if self._pending:
            self.galore_stats.warn_once(
                "pending_not_saved",
                f"GaLore: state_dict() in the middle of an accumulation window: the gradients of {len(self._pending)} "
                "weight(s) accumulated in their subspace are not saved (like `.grad`); save at step boundaries",
            )
        return super().state_dict()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``, which also discards the gradients accumulated in the subspace."""
        self._pending.clear()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip this optimizer's gradients by their global L2 norm, the subspace accumulators included.

        ``torch.nn.utils.clip_grad_norm_(model.parameters(), c)`` sees only
        ``.grad``, so with ``accumulate="lowrank"`` it would leave the
        projected weights out; call this instead. The norm of a weight that
        accumulated in its subspace is the upper bound of
        :meth:`~hf_galore.optim.accumulation.Accumulated.norm_bound`, so the
        clipped step never exceeds ``max_norm``. Returns the (pre-clip) norm.
        """
        check_non_negative("max_norm", max_norm)
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            if p in self._pending and p.grad is not None:
                self.accumulate_gradient(p)  # one bound for the whole window
        return accumulation.clip_grad_norm_(params, self._pending, max_norm)

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, *self._params_with_grad(group)) for group in self.param_groups]
        if self._pending and (getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None):
            self.grad_scale = self.found_inf = None
            raise UnsupportedSetupError(
                "torch.amp.GradScaler cannot check or unscale gradients accumulated in the subspace "
                "(`accumulate='lowrank'`): they are not in `.grad`. Train in bf16 (no scaler needed), or use "
                "`accumulate='full'` with the scaler"
            )
        self._run(work, self._scaler_flag(work))
        return loss

    def _scaler_flag(self, work: list[tuple[dict, list, list]]) -> torch.Tensor | None:
        """``torch.amp.GradScaler``'s verdict, when it hands one over (``_step_supports_amp_scaling``).

        The scaler has already checked the gradients (``self.found_inf``) and
        may pass the scale to divide them by (``self.grad_scale``); both are
        device tensors, never read here. Its skip applies to every group.
        """
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            inverse = grad_scale.double().reciprocal().float()
            for device_grads in _by_device([g for _, _, grads in work for g in grads]):
                torch._foreach_mul_(device_grads, inverse.to(device_grads[0].device))
        scaler_inf = getattr(self, "found_inf", None)
        return None if scaler_inf is None else (scaler_inf > 0).float()

    @torch.no_grad()
    def update_params(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> torch.Tensor | None:
        """Update ``params`` (all from ``group``) with ``grads``: one optimizer step for each.

        ``step()`` calls it (through ``_run``) for all groups at once; layer-wise
        mode calls it from a gradient hook with a single parameter, so both
        paths share every line of the update, and a weight whose gradient is
        not finite is skipped on its own. Returns the found-inf flag applied
        (``None`` with ``skip_nonfinite=False``).
        """
        if not params:
            return None
        return self._run([(group, params, grads)], None)

    def _run(self, work: list[tuple[dict, list, list]], scaler_flag: torch.Tensor | None) -> torch.Tensor | None:
        """Project every low-rank gradient, decide the step's found-inf flag, then update every group.

        The flag (GradScaler's semantics: one bad gradient skips the whole
        step) is computed without a host read from what the step reads anyway:
        the projected gradients ``R`` (a NaN/Inf in ``G`` is never projected to
        finite values) and the full-rank gradients. Only when a basis is due
        for a refresh is it computed first from the raw gradients and read,
        so that a skipped step never replaces a basis.
        """

        def guarded(group: dict) -> bool:
            return scaler_flag is not None or bool(group["skip_nonfinite"])

        for group, _, _ in work:
            if "rank" in group and "update_proj_gap" not in group:  # `rank` added to a full-rank group mid-run
                self._complete_lowrank_group(group)
        # the windows accumulated in the subspace end with this step (a NaN in any micro-batch is in them)
        finished = {p: self._pending.pop(p) for _, params, _ in work for p in params if p in self._pending}
        upfront: dict[str, torch.Tensor | None] = {}

        def step_flag() -> torch.Tensor | None:  # refresh steps only
            if "flag" not in upfront:
                raw = [g for group, _, grads in work if guarded(group) for g in grads if g is not None]
                raw += [finished[p].low for group, params, _ in work if guarded(group) for p in params if p in finished]
                upfront["flag"] = scaler_flag if scaler_flag is not None else nonfinite_flag(raw)
            return upfront["flag"]

        projected = [
            self._project_lowrank(group, params, grads, step_flag if guarded(group) else None, finished)
            if "rank" in group and params
            else None
            for group, params, grads in work
        ]
        if scaler_flag is not None:
            found_inf = scaler_flag
        elif "flag" in upfront:
            found_inf = upfront["flag"]
        else:
            checked = []
            for (group, _, grads), plan in zip(work, projected):
                if guarded(group):
                    checked += plan.lows if plan is not None else grads
            # projected shards of FSDP2 weights are plain tensors: agree across ranks all the same
            found_inf = nonfinite_flag(checked, across_ranks=_any_sharded(work))
        for (group, params, grads), plan in zip(work, projected):
            flag = found_inf if guarded(group) else None
            if plan is not None:
                if group.get("maximize"):  # R of −G is −R, in the same subspace: the basis stays G's
                    torch._foreach_neg_(plan.lows)
                self._apply_lowrank(group, plan, flag)
            elif params:
                with _negated(grads, bool(group.get("maximize"))):
                    self._step_full(group, params, grads, flag)
        if found_inf is not None:
            self.galore_stats.record_skip(found_inf)
        return found_inf

    def _step_full(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        found_inf: torch.Tensor | None,
    ) -> None:
        for p, g in zip(params, grads):
            self._refit_state(p, self.state[p], group, g.dtype)
        states = [self._state_for(p) for p in params]
        for g, s in zip(grads, states):
            self._init_moments(s, g, group)
            s["step"] += 1
        if any(p.is_complex() for p in params):  # as torch.optim.AdamW: the real view of each complex tensor
            params, grads, states = _real_views(params), _real_views(grads), [_real_state(s) for s in states]
        if found_inf is None:
            self._step_full_rank(group, params, grads, states)
            return
        if self._native_found_inf:
            self._step_full_rank(group, params, grads, states, found_inf=found_inf)
        else:
            with restored_where(found_inf, list(params) + [s[k] for s in states for k in _state_tensors(s)]):
                self._step_full_rank(group, params, grads, states)
        _unstep(states, found_inf)

    def _params_with_grad(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The parameters this step updates and their gradients: ``None`` for one whose whole window was
        accumulated in the subspace (its ``R`` waits in :attr:`_pending`)."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                if p in self._pending:
                    if "rank" not in group:
                        raise UnsupportedSetupError(
                            f"the weight of shape {tuple(p.shape)} accumulated its gradients in the subspace, "
                            "but its param group lost `rank` before the step; call `zero_grad()` before "
                            "changing a group's `rank` in the middle of an accumulation window"
                        )
                    params.append(p)
                    grads.append(None)
                continue
            if p.grad.is_sparse:
                raise UnsupportedSetupError(
                    f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                    f"{tuple(p.shape)}); use a dense embedding (`sparse=False`)"
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _project_lowrank(
        self, group: dict[str, Any], params, grads, step_flag, finished: Mapping[torch.Tensor, Any] | None = None
    ) -> _Projected:
        """Phase 1 of a low-rank step: refresh or track the bases and project every gradient.

        With the guard on (``step_flag`` given), a basis tracked every step is
        saved first with the rest of its state, to be put back if the step is
        skipped. A weight in ``finished`` accumulated its window in the
        subspace: its ``R`` is the accumulator (plus any gradient it still holds).
        """
        plan = _Projected()
        finished = finished or {}
        tracking = step_flag is not None and get_projector(group["projector"]).tracks_every_step
        live = [(p, g) for p, g in zip(params, grads) if g is not None]
        sync = self._basis_sync_for([p for p, _ in live], [g for _, g in live]) if live else self.basis_sync
        for p, g in zip(params, grads):
            entry = finished.get(p)
            self._refit_state(p, self.state[p], group, g.dtype if entry is None else entry.grad_dtype)
            state = self._state_for(p)
            if entry is not None:
                if g is not None:  # a gradient that reached .grad without a hook (the hooks were removed)
                    accumulation.absorb({p: entry}, p, group, state)
                plan.params.append(p)
                low, bases = accumulation.finish(entry, p, state, group)
                plan.lows.append(low)
                plan.bases.append(bases)
                plan.states.append(state)
                continue
            if tracking:
                plan.saved.append((state, {k: state[k].clone() for k in _state_tensors(state)}))
            projected = lowrank.project_gradient(p, g, state, group, self.galore_stats, sync=sync, step_flag=step_flag)
            if projected is None:
                continue
            low, bases = projected
            plan.params.append(p)
            plan.lows.append(low)
            plan.bases.append(bases)
            plan.states.append(state)
        return plan

    def _basis_sync_for(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> Any:
        """:attr:`basis_sync`, asking the engines once (the first low-rank step, the same one on every rank).

        Correctness under DDP depends on nothing else (no callback, no call
        to make): the DDP engine answers with its broadcast when the process
        group has two or more ranks and a DDP module wraps the weights.
        """
        if not self.basis_sync_decided:
            self.basis_sync_decided = True
            if self.basis_sync is None:
                self.basis_sync = engines.basis_sync_for(params, grads)
        return self.basis_sync

    def _apply_lowrank(self, group: dict[str, Any], plan: _Projected, found_inf: torch.Tensor | None) -> None:
        """Phase 2: base update of ``R``, decoupled weight decay, ``W ← W − scale·back(U)``."""
        for state, low in zip(plan.states, plan.lows):
            self._init_moments(state, low, group)
            state["step"] += 1
        if plan.params:
            updates, decay_lrs = self._guarded_updates(group, plan.params, plan.lows, plan.states, found_inf)
            wd = group["weight_decay"]
            for p, update, bases, decay_lr, state in zip(plan.params, updates, plan.bases, decay_lrs, plan.states):
                decay = 1.0 - decay_lr * wd if wd else None
                if decay is not None and found_inf is not None:  # times exactly 1.0: the weight stays bit-identical
                    decay = torch.where(found_inf.bool(), 1.0, torch.tensor(decay, dtype=torch.float32)).to(p.device)
                # a zero step and a unit decay written back (rounded or not) leave the weight as it was
                with _int8_stream_kept(p, found_inf):
                    key = self._rounding_key(p, group, state)
                    lowrank.apply_update(p, update, bases, group, decay=decay, rounding_key=key, found_inf=found_inf)
        if found_inf is None:
            return
        keep = found_inf.bool()
        for state, old in plan.saved:  # the tracked basis and its optimizer state (basis keys are re-assigned)
            for key, value in old.items():
                if state[key].shape == value.shape:
                    state[key] = torch.where(keep.to(value.device), value, state[key])
        _unstep(plan.states, found_inf)

    def _guarded_updates(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict],
        found_inf: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor], list[float]]:
        """:meth:`_lowrank_updates` whose steps are zero and state unchanged where ``found_inf`` is set."""
        if found_inf is None:
            return self._lowrank_updates(group, params, grads, states)
        if self._native_found_inf:  # the member leaves its state as it was and returns zero steps
            return self._lowrank_updates(group, params, grads, states, found_inf=found_inf)
        declared = type(self).state_keys  # what the base update writes; bases, finder and policy state are not
        moments = [s[k] for s in states for k in _state_tensors(s) if k in declared]
        with restored_where(found_inf, moments):
            updates, lrs = self._lowrank_updates(group, params, grads, states)
        return zero_where(found_inf, updates), lrs

    def _rounding_key(self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> int | None:
        """Seed of this step's stochastic rounding of ``param``, or ``None`` to round to nearest.

        Only plain bf16 / fp16 weights in a group with ``stochastic_rounding``
        are rounded stochastically. The key mixes the group's ``sr_seed``, the
        parameter's position in the optimizer and its ``step`` (already
        incremented), all saved in ``state_dict()``: a resumed run rounds as
        the uninterrupted one. ``step`` lives on the CPU, so reading it
        does not wait for the device.
        """
        if param.dtype not in SR_DTYPES or not group.get("stochastic_rounding", True):
            return None
        if type(param) is not torch.nn.Parameter and type(param) is not torch.Tensor:
            return None  # tensor subclasses (FSDP2's DTensor) keep round-to-nearest
        positions = self.__dict__.get("_param_index") or {}  # not pickled: torch's __getstate__ keeps 3 keys
        index = positions.get(param)
        if index is None:
            positions = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            self._param_index = positions
            index = positions[param]
        return derive_seed(int(group.get("sr_seed", 0)), index, int(state["step"]))

    # ------------------------------------------------------------ declaration
    #: registry name (``hf_galore.optim.members.BASE_OPTIMIZERS``; ``estimate_memory`` methods name it)
    name: ClassVar[str]
    #: every state key :meth:`_init_moments` may create: its dtype, FSDP2 sharding and rotation
    #: (another member's keys in a loaded state are refused)
    state_keys: ClassVar[Mapping[str, StateKey]] = {}
    #: hyper-parameters every group of this member has; a loaded group without them is another optimizer's
    _group_identity: tuple[str, ...] = ()

    @classmethod
    def state_layout(
        cls, like: tuple[int, ...], group: Mapping[str, Any], state: Mapping[str, Any], *, dtype: torch.dtype
    ) -> dict[str, StateTensor]:
        """The tensors :meth:`_init_moments` makes for a gradient of shape ``like`` and dtype ``dtype``.

        ``state`` (possibly loaded, possibly empty) picks between layouts where
        a member has several (8-bit or 32-bit moments). The shape checks, the
        memory estimate and the start-up summary all read this one declaration.
        """
        raise NotImplementedError

    @classmethod
    def _entry(cls, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> StateTensor:
        """``key``'s :class:`StateTensor`: its declared dtype, else the gradient's ``dtype``."""
        return StateTensor(tuple(shape), cls.state_keys[key].dtype or dtype)

    @classmethod
    def state_bytes(cls, like: tuple[int, ...], dtype: torch.dtype, group: Mapping[str, Any]) -> int:
        """Bytes of the base update's state for a gradient of shape ``like`` (the ``step`` counter excluded)."""
        return layout_bytes(cls.state_layout(tuple(like), group, {}, dtype=dtype))

    @classmethod
    def update_transient_bytes(cls, like: tuple[int, ...], *, lowrank: bool, dtype: torch.dtype = torch.float32) -> int:
        """Temporaries of one update of a gradient of shape ``like`` and ``dtype`` (the memory estimate's
        ``transient``), beyond the gradient itself.

        This default: three float32 tensors of the gradient's size (32-bit Adam's and Adafactor's kernels).
        """
        return 3 * 4 * math.prod(like)

    #: constructor keywords that are checked once and never become group keys (a peer's switches)
    _constructor_only: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def default_hyperparams(cls) -> dict[str, Any]:
        """A group's settings when none are given: the constructor's keyword defaults (``lr``, ``betas``, ...)
        and torch.optim's flags."""
        return {
            **TORCH_FLAG_DEFAULTS,
            **{
                name: p.default
                for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty and name not in cls._constructor_only
            },
        }

    def _init_moments(self, state: dict[str, Any], like: torch.Tensor, group: dict[str, Any]) -> None:
        """Create the base update's state for gradient ``like`` unless it exists.

        Called before every update, so implementations return early when
        their state is already there (e.g. after ``load_state_dict``). Existing
        state always has the shapes :meth:`_moment_shapes` declares: it is
        checked (and re-made or refused) before this is called.
        """
        raise NotImplementedError

    def _moment_shapes(
        self, like: tuple[int, ...], group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        """The shapes of :meth:`state_layout` (what the shape checks compare)."""
        return {key: entry.shape for key, entry in self.state_layout(like, group, state, dtype=torch.float32).items()}

    def _mismatch_hint(self, key: str, expected: Any, found: Any) -> str:
        """Why a loaded state entry may have this wrong shape, when the member knows (e.g. an older layout).

        Returned text (starting with ``"; "``) replaces the generic cause in
        the load error; ``""`` keeps it.
        """
        return ""

    def _lowrank_updates(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict]
    ) -> tuple[list[torch.Tensor], list[float]]:
        """Base update of low-rank gradients.

        Returns the steps ``U`` (learning rate included; the weight moves by
        ``−scale·back(U)``) and, per weight, the learning rate that scales
        decoupled weight decay. ``step`` in each state is already incremented.
        """
        raise NotImplementedError

    def _step_full_rank(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict]
    ) -> None:
        """Update a full-rank group in place (weight decay included)."""
        updates, decay_lrs = self._lowrank_updates(group, params, grads, states)
        wd = group["weight_decay"]
        for p, update, decay_lr, state in zip(params, updates, decay_lrs, states):
            key = self._rounding_key(p, group, state)
            if key is not None:
                add_rounded_(p, update, alpha=-1.0, decay=1.0 - decay_lr * wd if wd else None, key=key)
                continue
            if wd:
                p.mul_(1.0 - decay_lr * wd)
            p.sub_(update.to(p.dtype))


@dataclass
class _Projected:
    """What phase 1 of a low-rank step hands to phase 2 (weights without a basis yet are left out)."""

    params: list = field(default_factory=list)
    lows: list = field(default_factory=list)
    bases: list = field(default_factory=list)
    states: list = field(default_factory=list)
    #: (state, its tensors before the step) of bases tracked every step, under the guard
    saved: list = field(default_factory=list)


@contextlib.contextmanager
def _int8_stream_kept(param: torch.Tensor, found_inf: torch.Tensor | None) -> Iterator[None]:
    """An INT8 weight is re-quantized with stochastic rounding even by a zero step: on a skipped
    step ``apply_update`` puts its codes and scales back block by block, and this puts back its
    rounding-stream position."""
    owner = None if found_inf is None else int8_owner(param)
    yield
    if owner is not None:
        owner.sr_step.sub_(_host_flag(found_inf).to(owner.sr_step.dtype))


@contextlib.contextmanager
def _negated(grads: list[torch.Tensor], negate: bool) -> Iterator[None]:
    """``maximize=True``: the gradients negated in place for the block, then put back (negation is exact)."""
    if not negate or not grads:
        yield
        return
    torch._foreach_neg_(grads)
    try:
        yield
    finally:
        torch._foreach_neg_(grads)


def remove_hook_handles(handles: list[Any]) -> None:
    """Remove gradient-hook handles (at garbage collection of the optimizer holding them, or by hand)."""
    for handle in handles:
        handle.remove()
    handles.clear()


def _real_views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _real_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its complex tensors as real views (updates write through; ``step`` is the same tensor)."""
    return {k: torch.view_as_real(v) if isinstance(v, torch.Tensor) and v.is_complex() else v for k, v in state.items()}


def _unstep(states: list[dict], found_inf: torch.Tensor) -> None:
    """Take back the step-counter increment of a skipped step (the counters are CPU tensors)."""
    if states:
        host = _host_flag(found_inf)
        for s in states:
            s["step"].sub_(host)


def _any_sharded(work: list[tuple[dict, list, list]]) -> bool:
    return any(type(p) is not torch.Tensor and hasattr(p, "to_local") for _, params, _ in work for p in params)


def _by_device(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return list(buckets.values())
