"""``GaLoreOptimizer``: the loop, the projection and the state layout shared by every member.

Subclasses add only their base update (Adam, 8-bit Adam, Adafactor) through
three methods: :meth:`_init_moments`, :meth:`_lowrank_updates` and
:meth:`_step_full_rank`. A param group with the key ``rank`` is low-rank
(galore-torch's convention); any other group is a plain full-rank group.

Low-rank step for weight ``W`` with gradient ``G`` (2-D view, see
``as_matrix``):  ``R = project(G)``; ``U, lr_wd = base_update(R)``;
``W ← W·(1 − lr_wd·wd)``; ``W ← W − scale·back(U)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ..errors import GaLoreConfigError, UnsupportedSetupError
from ..projectors.randomized import derive_seed
from ..quant.int8 import int8_owner
from ..quant.rounding import SR_DTYPES, add_rounded_
from . import lowrank, state_checks
from .stats import RefreshStats
from .validation import (
    LOWRANK_DEFAULTS,
    ROUNDING_DEFAULTS,
    check_full_rank_group_keys,
    check_group_keys,
    check_lowrank_keys,
    check_non_negative,
    check_rounding_keys,
    check_torch_flags,
)


class GaLoreOptimizer(Optimizer):
    """Base class: do not instantiate; use ``GaLoreAdamW`` and friends."""

    #: ``basis -> basis`` applied to every new basis before it is stored; set by
    #: ``hf_galore.distributed.synchronize_bases`` so data-parallel ranks share one basis
    basis_sync = None

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.galore_stats = RefreshStats()
        self._param_index: dict[torch.Tensor, int] = {}
        super().__init__(params, {**ROUNDING_DEFAULTS, **defaults})
        # FSDP2: low-rank shards appear as DTensors in state_dict() so that
        # torch.distributed.checkpoint saves every rank's part (no-ops otherwise)
        from ..distributed import (
            sharded_load_state_dict_pre_hook,
            sharded_state_dict_post_hook,
        )

        self.register_state_dict_post_hook(sharded_state_dict_post_hook)
        self.register_load_state_dict_pre_hook(sharded_load_state_dict_pre_hook)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and "rank" in param_group:  # the keys as written, before defaults
            check_group_keys(param_group, self.defaults)
            check_torch_flags(param_group)
        elif isinstance(param_group, dict):
            check_full_rank_group_keys(param_group, self.defaults)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        if "rank" in group:
            for key, value in LOWRANK_DEFAULTS.items():
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
        elif any(int8_owner(p) is not None for p in group["params"]):
            raise GaLoreConfigError(
                "an INT8 weight (`Int8Linear.weight`, see `prepare_model_for_int8_weights`) is in a group "
                "without `rank`; its updates are applied with stochastic rounding by the low-rank path only. "
                "Put it in a low-rank group, or lower `rank` below its smaller dimension"
            )

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Per-member hyper-parameter checks; the base checks what all share."""
        if group.get("lr") is not None:
            check_non_negative("lr", float(group["lr"]))
        check_non_negative("weight_decay", group.get("weight_decay", 0.0))
        check_rounding_keys(group)

    # ------------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping each state tensor's saved dtype.

        ``torch.optim.Optimizer`` casts every floating state tensor to its
        parameter's dtype, which would turn quantized bases and 8-bit moments
        into floats and round float32 bases of bf16 weights. We restore the
        saved dtype afterwards (lossless: the saved tensors are the source).

        State that would not fit its group after loading (other settings,
        another model or parameter order, another optimizer, galore-torch or
        a full-rank optimizer's moments in a low-rank group) is refused with
        ``StateMismatchError`` before anything changes; a basis holding NaN/Inf
        is dropped, recomputed at the next step, warned about and counted
        (``galore_stats.dropped_bases``).
        """
        state_checks.check_loadable(self, state_dict)
        built = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        super().load_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        for group, saved_group, own in zip(self.param_groups, saved_groups, built):
            for key, value in own.items():  # checkpoints from before a hyper-parameter existed
                group.setdefault(key, value)
            if "rank" in group:  # ... or a group key
                for key, value in LOWRANK_DEFAULTS.items():
                    group.setdefault(key, value)
            for param, param_id in zip(group["params"], saved_group["params"]):
                saved = state_dict["state"].get(param_id)
                if saved is None:
                    continue
                live = self.state[param]
                for key, value in saved.items():
                    if isinstance(value, torch.Tensor) and live[key].dtype != value.dtype:
                        live[key] = value.to(device=param.device if key != "step" else value.device, copy=True)
                if isinstance(live.get("step"), (int, float)):  # torch < 1.12 and galore-torch save an int
                    live["step"] = torch.tensor(float(live["step"]), dtype=torch.float32)
        dropped = state_checks.drop_nonfinite_bases(self)
        if dropped:
            self.galore_stats.dropped_bases += dropped
            self.galore_stats.warn_once(
                "nonfinite_loaded_basis",
                f"GaLore: {dropped} basis/bases in the loaded state hold NaN/Inf; dropped them, new ones are "
                "computed at the next step (counted in galore_stats.dropped_bases)",
            )

    def _refit_state(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Re-make ``param``'s state if it no longer fits ``group`` (``rank`` / ``proj_type`` changed mid-run).

        Shapes only, no device sync. The new state is that of a new weight:
        basis computed at this step, moments and ``step`` from zero (so Adam's
        bias correction and the refresh schedule restart). Warned once,
        counted in ``galore_stats.state_resets``.
        """
        if "step" not in state or lowrank.is_sharded(param):
            return
        mismatch = state_checks.find_mismatch(self, param, state, group)
        if mismatch is None:
            return
        state.clear()
        self.galore_stats.state_resets += 1
        index = next((i for i, g in enumerate(self.param_groups) if g is group), "?")
        self.galore_stats.warn_once(
            "state_remade",
            f"GaLore: the state of a weight of shape {tuple(param.shape)} in param group {index} no longer fits "
            f"the group ({state_checks.describe(mismatch, group)}); re-made it: new basis now, moments and step "
            "from zero. Expected after changing `rank` or `proj_type` during training (docs/optimizers.md); "
            "counted in galore_stats.state_resets",
        )

    def _state_for(self, param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = self._params_with_grad(group)
            self.update_params(group, params, grads)
        return loss

    @torch.no_grad()
    def update_params(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Update ``params`` (all from ``group``) with ``grads``: one optimizer step for each.

        ``step()`` calls it once per group; layer-wise mode calls it from a
        gradient hook with a single parameter, so both paths share every line
        of the update.
        """
        if not params:
            return
        if "rank" in group:
            self._step_lowrank(group, params, grads)
        else:
            states = [self._state_for(p) for p in params]
            for g, s in zip(grads, states):
                self._init_moments(s, g, group)
                s["step"] += 1
            self._step_full_rank(group, params, grads, states)

    def _params_with_grad(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise UnsupportedSetupError(
                    f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                    f"{tuple(p.shape)}); use a dense embedding (`sparse=False`)"
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _step_lowrank(self, group: dict[str, Any], params, grads) -> None:
        stepped_params, stepped_lowrank, stepped_bases, stepped_states = [], [], [], []
        for p, g in zip(params, grads):
            self._refit_state(p, self.state[p], group)
            state = self._state_for(p)
            projected = lowrank.project_gradient(p, g, state, group, self.galore_stats, sync=self.basis_sync)
            if projected is None:
                continue
            low, bases = projected
            self._init_moments(state, low, group)
            state["step"] += 1
            stepped_params.append(p)
            stepped_lowrank.append(low)
            stepped_bases.append(bases)
            stepped_states.append(state)
        if not stepped_params:
            return
        updates, decay_lrs = self._lowrank_updates(group, stepped_params, stepped_lowrank, stepped_states)
        wd = group["weight_decay"]
        for p, update, bases, decay_lr, state in zip(stepped_params, updates, stepped_bases, decay_lrs, stepped_states):
            decay = 1.0 - decay_lr * wd if wd else None
            lowrank.apply_update(p, update, bases, group, decay=decay, rounding_key=self._rounding_key(p, group, state))

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

    # ---------------------------------------------------------- member hooks
    #: every state key ``_init_moments`` may create; another member's keys in a loaded state are refused
    _moment_keys: frozenset[str] = frozenset()
    #: hyper-parameters every group of this member has; a loaded group without them is another optimizer's
    _group_identity: tuple[str, ...] = ()

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
        """The state keys and shapes :meth:`_init_moments` makes for a gradient of shape ``like``.

        ``state`` (possibly loaded) picks between layouts where a member has
        several (8-bit or 32-bit moments). Used by the shape checks.
        """
        raise NotImplementedError

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
