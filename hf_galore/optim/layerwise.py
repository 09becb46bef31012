"""Layer-wise updates: each weight is updated inside its gradient hook and its gradient freed at once.

GaLore (arXiv:2403.03507, §4.3 "per-layer weight updates") trains a 7B model
on a 24 GB card partly because full gradients never coexist: as soon as
autograd has finished accumulating a weight's gradient, that weight is
updated and the gradient released, so the live gradient memory is about one
weight's gradient instead of the whole model's.

:class:`LayerwiseOptimizer` does this around one real GaLore optimizer. Its
``param_groups``, ``state`` and ``defaults`` *are* the inner optimizer's, so

* an LR scheduler built on it drives every per-weight update (the hook reads
  ``group["lr"]`` at the moment it runs);
* ``state_dict()`` / ``load_state_dict()`` hold the full state (bases, moments,
  per-weight ``step`` tensors) and are interchangeable with the regular
  optimizer's checkpoints;
* the per-weight update is :meth:`GaLoreOptimizer.update_params` called with a
  single parameter, so layer-wise and regular mode share every line of the
  maths.

With gradient accumulation, the hook of a non-final micro-batch projects the
gradient into the weight's subspace and frees it
(:mod:`hf_galore.optim.accumulation`, group key ``accumulate``), so a window
of micro-batches holds ``r × n`` accumulators, not full gradients.

``step()`` commits one optimizer step: it updates whatever the hooks did not
(parameters without a hook, or the remainder of an accumulation window),
frees those gradients, publishes the step's gradient norm and re-arms the
hooks. Each weight is updated at most once between two ``step()`` calls, so
per-weight step counters, refresh schedules and LR schedules advance exactly
once per optimizer step whatever the number of layers.

NOTE: the reference per-layer implementation (galore-torch's
``torchrun_main.py --optimizer galore_adamw8bit_per_layer``, copied by
transformers' ``LayerWiseDummyOptimizer``) keeps one optimizer and one
scheduler per weight behind a dummy whose ``step``/``state_dict`` are empty;
its step counters and schedules advance per layer, gradient accumulation is
refused and resuming loses the optimizer state. See docs/layerwise.md.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import GaLoreConfigError, UnsupportedSetupError
from ..numerics import l2_norm
from .accumulation import accumulates_in_subspace
from .base import GaLoreOptimizer, claim_params, param_owner, release_params, remove_hook_handles
from .validation import check_positive, check_positive_int

#: Added to a gradient norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does.
_CLIP_EPS = 1e-6


def accelerate_sync_gradients() -> bool:
    """``True`` on the last micro-batch of an accumulation window, as accelerate and the Trainer see it.

    The Trainer sets ``GradientState.sync_gradients`` before every backward
    (``_set_sync_gradients(do_sync_step)``), and so does
    ``accelerator.accumulate(model)``, so a hook can read whether the
    gradient it sees is final.
    """
    from accelerate.state import GradientState

    return bool(GradientState().sync_gradients)


def _auto_sync() -> bool:
    """accelerate's ``sync_gradients`` once accelerate has set it up in this process, else ``True``."""
    state_module = sys.modules.get("accelerate.state")
    if state_module is None or not getattr(state_module.GradientState, "_shared_state", None):
        return True
    return accelerate_sync_gradients()


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return False
    return isinstance(tensor, DTensor)


#: parameter -> ``weakref.ref`` of the LayerwiseOptimizer whose gradient hook is on it (to warn when a
#: newer one takes over). A hook acts only while its optimizer also owns the parameter
#: (``base.param_owner``): a newer optimizer of any kind built on the same weights silences it.
_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _hooked_by(param: torch.Tensor) -> LayerwiseOptimizer | None:
    ref = _HOOKED.get(param)
    return None if ref is None else ref()


def _weak_hook(ref: weakref.ref) -> Callable[[torch.Tensor], None]:
    """A gradient hook holding its optimizer weakly: a dropped optimizer cannot act on the model."""

    def hook(param: torch.Tensor) -> None:
        optimizer = ref()
        if optimizer is not None:
            optimizer._hook(param)

    return hook


_DDP_MESSAGE = (
    "layer-wise mode updates each weight inside its gradient hook, before DDP (or any engine "
    "that all-reduces gradients after backward) has averaged the gradients across the {world} "
    "processes, so ranks would diverge. Use the regular optimizer (`layerwise=False`, or "
    "optim='galore_adamw' instead of 'galore_adamw_layerwise'), or update after the reduction: "
    "build `LayerwiseOptimizer(..., register_hooks=False)` and pass it to "
    "`hf_galore.distributed.register_layerwise_ddp_hook(ddp_model, optimizer)` (docs/distributed.md)."
)


# NOTE: subclasses Optimizer so torch's LR schedulers and accelerate accept it, but does not call
# Optimizer.__init__: the param groups and state live in the wrapped optimizer (same pattern as
# torchao's CPUOffloadOptimizer, torchao/optim/cpu_offload.py).
class LayerwiseOptimizer(Optimizer):
    """Run a GaLore optimizer layer-wise: one weight at a time, inside its gradient hook.

    Args:
        params: the optimizer doing the maths (``GaLoreAdamW``,
            ``GaLoreAdamW8bit``, ``GaLoreAdafactor`` or any ``GaLoreOptimizer``),
            whose param groups, state and hyper-parameters are used as they
            are; or param groups, with ``optimizer_class`` and its keyword
            arguments (``**optimizer_kwargs``) to build it — the form the
            Trainer uses.
        per_param_max_norm: clip each parameter's gradient to this L2 norm
            before its update (``None``: no clipping). This is *per-parameter*
            clipping: global-norm clipping needs every gradient at once, which
            is exactly what layer-wise mode avoids. ``g ← g·min(1, c/(‖g‖+1e-6))``.
        accumulation_steps: update each weight on every ``k``-th gradient its
            hook sees (gradient accumulation in a plain loop); ``step()``
            applies a shorter final window. Alternatives:
            :meth:`accumulating` and ``sync``.
        sync: decides in each hook whether the gradient is final for this
            optimizer step. ``"auto"`` (default) follows accelerate's
            ``GradientState.sync_gradients`` once accelerate is in use (the
            Trainer and ``accelerator.accumulate`` set it per micro-batch) and
            treats every gradient as final otherwise; ``None`` always treats
            it as final; or pass a function returning ``bool``. Ignored
            when ``accumulation_steps > 1``.
        register_hooks: register ``register_post_accumulate_grad_hook`` on
            every trainable parameter. An engine that must act between the
            gradient and the update (e.g. an all-reduce) passes ``False`` and
            calls :meth:`update_param` itself.

    Gradients of hooked parameters are ``None`` after ``backward()``; read the
    step's gradient norm from :attr:`last_grad_norm` (after ``step()``) or
    :meth:`current_grad_norm` (before it).
    """

    # GradScaler then hands step() its `grad_scale` / `found_inf` instead of asserting "No inf checks were
    # recorded" (the hooks freed every gradient), and step() refuses it by name
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: GaLoreOptimizer | Iterable[Any],
        optimizer_class: type[GaLoreOptimizer] | None = None,
        *,
        per_param_max_norm: float | None = None,
        accumulation_steps: int = 1,
        sync: Callable[[], bool] | Literal["auto"] | None = "auto",
        register_hooks: bool = True,
        **optimizer_kwargs: Any,
    ) -> None:
        if isinstance(params, GaLoreOptimizer):
            if optimizer_class is not None or optimizer_kwargs:
                raise GaLoreConfigError(
                    "pass either a built optimizer, or params with `optimizer_class` and its keyword "
                    f"arguments, not both (got `optimizer_class`={optimizer_class!r}, {sorted(optimizer_kwargs)})"
                )
            optimizer = params
        elif isinstance(params, Optimizer):
            raise GaLoreConfigError(
                f"`params` must be a GaLoreOptimizer (GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor), got "
                f"{type(params).__name__!r}: layer-wise mode calls its per-weight `update_params`"
            )
        elif optimizer_class is None:
            raise GaLoreConfigError(
                "`optimizer_class` is required when LayerwiseOptimizer gets parameters: e.g. "
                "LayerwiseOptimizer(param_groups, GaLoreAdamW, lr=1e-3), or LayerwiseOptimizer(GaLoreAdamW(...))"
            )
        elif not (isinstance(optimizer_class, type) and issubclass(optimizer_class, GaLoreOptimizer)):
            raise GaLoreConfigError(
                f"`optimizer_class` must be a GaLoreOptimizer subclass (GaLoreAdamW, GaLoreAdamW8bit, "
                f"GaLoreAdafactor), got {optimizer_class!r}: layer-wise mode calls its per-weight `update_params`"
            )
        else:
            optimizer = optimizer_class(params, **optimizer_kwargs)
        if per_param_max_norm is not None:
            check_positive("per_param_max_norm", per_param_max_norm)
        check_positive_int("accumulation_steps", accumulation_steps)
        if sync == "auto":
            sync = _auto_sync
        elif sync is not None and not callable(sync):
            raise GaLoreConfigError(f"`sync` must be 'auto', None or a function returning bool, got {sync!r}")
        self.optimizer = optimizer
        self.per_param_max_norm = per_param_max_norm
        self.accumulation_steps = accumulation_steps
        self.sync = sync
        self.hooks_registered = register_hooks
        #: L2 norm of the last committed step's full (pre-clip) gradient; ``None`` before the first.
        self.last_grad_norm: torch.Tensor | None = None
        # Attributes torch.optim.Optimizer's helpers expect (see Optimizer.__init__).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

        self._group_index: dict[torch.Tensor, int] = {}
        self._handles: list[Any] = []
        self._updated: set[torch.Tensor] = set()  # updated since the last step()
        self._seen: dict[torch.Tensor, int] = {}  # hook calls in the current accumulation window
        self._norm_sq: torch.Tensor | None = None
        self._holding = 0
        # the hooks go when this optimizer is garbage-collected (they hold it weakly)
        weakref.finalize(self, remove_hook_handles, self._handles)
        for index, group in enumerate(self.optimizer.param_groups):
            self._track(group["params"], index)

    # ------------------------------------------------------- shared with inner
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def galore_stats(self):
        """The inner optimizer's refresh counters (read by ``GaLoreCallback``)."""
        return self.optimizer.galore_stats

    def __repr__(self) -> str:
        return f"LayerwiseOptimizer({self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        """What rebuilds an equal layer-wise optimizer: the inner optimizer and the settings (not the hooks)."""
        return {
            "optimizer": self.optimizer,
            "per_param_max_norm": self.per_param_max_norm,
            "accumulation_steps": self.accumulation_steps,
            "sync": self.sync,
            "register_hooks": self.hooks_registered,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy or an unpickled optimizer hooks its own parameters (those of the copied inner optimizer)."""
        state = dict(state)
        optimizer = state.pop("optimizer")
        sync = state.pop("sync")
        self.__init__(optimizer, sync=None, **state)  # type: ignore[misc]
        self.sync = sync

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        index = len(self.optimizer.param_groups) - 1
        self._track(self.optimizer.param_groups[index]["params"], index)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict: regular and layer-wise checkpoints are interchangeable."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self._updated.clear()
        self._seen.clear()
        self._norm_sq = None

    # ------------------------------------------------------------------ hooks
    def _track(self, params: list[torch.Tensor], index: int) -> None:
        for p in params:
            if _is_dtensor(p):
                raise UnsupportedSetupError(
                    "layer-wise mode got a DTensor parameter (FSDP2 or tensor parallel): sharded "
                    "gradients are written by the engine, not accumulated by autograd, so per-weight "
                    "hooks never fire. Use the regular optimizer (`layerwise=False`); see docs/distributed.md"
                )
            self._group_index[p] = index
        if self.hooks_registered:
            self._hook_params(params)

    def _hook_params(self, params: list[torch.Tensor]) -> None:
        taken_over = 0
        ref = weakref.ref(self)
        for p in params:
            if not p.requires_grad:
                continue
            previous = _hooked_by(p)
            if previous is not None and previous is not self and previous.hooks_registered:
                taken_over += 1
            _HOOKED[p] = ref
            claim_params([p], self)
            self._handles.append(p.register_post_accumulate_grad_hook(_weak_hook(ref)))
        if taken_over:
            warnings.warn(
                f"{taken_over} parameters already had the gradient hook of another LayerwiseOptimizer; the "
                "newest one now updates them and the older one ignores them (call `remove_hooks()` on the "
                "older optimizer to say this is intended)",
                UserWarning,
                stacklevel=4,
            )
        self._check_world()

    @staticmethod
    def _check_world() -> None:
        world = _world_size()
        if world > 1:
            raise UnsupportedSetupError(_DDP_MESSAGE.format(world=world))

    def remove_hooks(self) -> None:
        """Detach the gradient hooks; ``step()`` then updates every weight, as the regular optimizer does.

        ``GaLoreCallback`` calls it when the Trainer's training ends, so a model
        outliving its Trainer carries no hooks (and re-arms them with
        :meth:`register_hooks` if the same Trainer trains again).
        """
        remove_hook_handles(self._handles)
        release_params(self._group_index, self)
        for p in self._group_index:
            if _hooked_by(p) is self:
                del _HOOKED[p]
        self.hooks_registered = False

    def register_hooks(self) -> None:
        """Attach the gradient hooks again after :meth:`remove_hooks` (no-op while attached)."""
        if self.hooks_registered:
            return
        self.hooks_registered = True
        self._hook_params(list(self._group_index))

    def _hook(self, param: torch.Tensor) -> None:
        if param.grad is None or param_owner(param) is not self:
            return  # a newer optimizer drives this parameter
        self._check_world()  # DDP may wrap the model after the optimizer was built
        if self._holding:
            self._accumulate(param)
            return
        if self.accumulation_steps > 1:
            seen = self._seen.get(param, 0) + 1
            self._seen[param] = seen
            if seen < self.accumulation_steps:
                self._accumulate(param)
                return
        elif self.sync is not None and not self.sync():
            self._accumulate(param)
            return
        self.update_param(param)

    def _accumulate(self, param: torch.Tensor) -> None:
        """A non-final micro-batch: project the gradient into the weight's subspace and free it, where allowed.

        Group key ``accumulate`` (``"auto"``, the default, and ``"lowrank"``);
        full-rank weights, weights without a basis yet or due for a refresh at
        this step, and finders that track every step keep accumulating in
        ``.grad`` (``hf_galore.optim.accumulation``).
        """
        group = self.optimizer.param_groups[self._group_index[param]]
        if accumulates_in_subspace(group, layerwise=True):
            self.optimizer.accumulate_gradient(param)

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Backward passes inside this block only accumulate gradients; the next one outside updates.

        For gradient accumulation in a plain loop::

            for i, batch in enumerate(micro_batches):
                ctx = opt.accumulating() if i < len(micro_batches) - 1 else contextlib.nullcontext()
                with ctx:
                    (loss_fn(model, batch) / len(micro_batches)).backward()
            opt.step()
        """
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update_param(self, param: torch.Tensor) -> None:
        """Update one weight with its current gradient (clip, record its norm, step), then free the gradient.

        A weight that accumulated this window in its subspace folds the final
        gradient in too; its norm is then the accumulator's upper bound
        (``Accumulated.norm_bound``), and clipping scales the accumulator.
        """
        grad = param.grad
        pending = self.optimizer.pending_gradient(param)
        if grad is None and pending is None:
            return
        if grad is not None and grad.is_sparse:
            raise UnsupportedSetupError(
                f"layer-wise mode does not support sparse gradients (parameter of shape "
                f"{tuple(param.shape)}); use a dense embedding (`sparse=False`)"
            )
        if param in self._updated:
            raise UnsupportedSetupError(
                f"the parameter of shape {tuple(param.shape)} received a second final gradient before "
                "`optimizer.step()`: layer-wise mode updates each weight once per optimizer step. Call "
                "`optimizer.step()` after every update backward, and for gradient accumulation wrap the "
                "non-final backward passes in `with optimizer.accumulating():` (or build the optimizer "
                "with `accumulation_steps=k`)"
            )
        group = self.optimizer.param_groups[self._group_index[param]]
        if pending is not None and grad is not None:
            self.optimizer.accumulate_gradient(param)  # the final micro-batch joins its window
        norm = _norm_of(param, pending)
        self._add_norm_sq(norm)
        if self.per_param_max_norm is not None:
            coef = torch.clamp(self.per_param_max_norm / (norm + _CLIP_EPS), max=1.0)
            if pending is not None:
                pending.scale_(coef)
            if param.grad is not None:
                param.grad.mul_(coef.to(param.grad.dtype))
        self.optimizer.update_params(group, [param], [param.grad])
        param.grad = None
        self._updated.add(param)
        self._seen.pop(param, None)

    def _add_norm_sq(self, norm: torch.Tensor) -> None:
        sq = norm.square()
        if self._norm_sq is None:
            self._norm_sq = sq
        else:
            self._norm_sq = self._norm_sq + sq.to(self._norm_sq.device)

    def current_grad_norm(self) -> torch.Tensor:
        """L2 norm of this step's full gradient so far: weights already updated plus gradients still held.

        Pre-clip, like the value ``torch.nn.utils.clip_grad_norm_`` returns.
        """
        total = self._norm_sq.clone() if self._norm_sq is not None else None
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                pending = self.optimizer.pending_gradient(p)
                if (p.grad is not None or pending is not None) and p not in self._updated:
                    sq = _norm_of(p, pending).square()
                    total = sq if total is None else total + sq.to(total.device)
        if total is None:
            return torch.tensor(0.0)
        return total.sqrt()

    @Optimizer.profile_hook_step  # runs hooks from register_step_pre_hook / register_step_post_hook
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Commit one optimizer step.

        Weights whose hooks already ran are not touched again; any parameter
        still holding a gradient (no hook, or the end of a shorter
        accumulation window) is updated now and its gradient freed.
        """
        _refuse_grad_scaler(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                held = p.grad is not None or self.optimizer.pending_gradient(p) is not None
                if held and p not in self._updated:
                    self.update_param(p)
        self.last_grad_norm = self._norm_sq.sqrt() if self._norm_sq is not None else None
        self._norm_sq = None
        self._updated.clear()
        self._seen.clear()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients still held (mid-window accumulation) and restart the accumulation window.

        Also forgets which weights this step already updated: after a backward
        that raised half-way, ``zero_grad()`` lets the next backward update
        every weight again instead of refusing a "second final gradient".
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._seen.clear()
        self._updated.clear()
        self._norm_sq = None


def _norm_of(param: torch.Tensor, pending: Any) -> torch.Tensor:
    """The L2 norm of ``param``'s gradient this step: its ``.grad``, or the bound of its subspace accumulator
    (with any ``.grad`` not yet folded in)."""
    if pending is None:
        return l2_norm(param.grad)
    bound = pending.norm_bound()
    if param.grad is None:
        return bound
    return (bound.square() + l2_norm(param.grad).square().to(bound.device)).sqrt()


def _refuse_grad_scaler(optimizer: LayerwiseOptimizer) -> None:
    """``GradScaler.step(layerwise_optimizer)``: refused by name; the scaled gradients were applied in backward."""
    if getattr(optimizer, "grad_scale", None) is None and getattr(optimizer, "found_inf", None) is None:
        return
    optimizer.grad_scale = optimizer.found_inf = None
    raise UnsupportedSetupError(
        "torch.amp.GradScaler cannot drive layer-wise mode: each weight is updated inside backward, before the "
        "scaler can unscale and check its gradient (the weights were updated with scaled gradients). Train in "
        "bf16 (no scaler needed: autocast(dtype=torch.bfloat16), or the Trainer's `bf16=True`), or use the "
        "regular optimizer (`layerwise=False`) with the scaler"
    )


def as_layerwise(optimizer: Optimizer) -> LayerwiseOptimizer | None:
    """The :class:`LayerwiseOptimizer` behind ``optimizer`` (unwrapping accelerate's wrapper), or ``None``."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, LayerwiseOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None
