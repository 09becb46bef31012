"""``GaLoreCallback``: proves the Trainer runs an hf_galore optimizer and shows what it does.

Users have lost runs to a silent fallback to plain AdamW and to target
patterns that matched nothing, so at train start the callback

* raises when a GaLore ``optim`` name was set but the Trainer holds another
  optimizer (a ``Trainer`` subclass overriding ``create_optimizer``, a stale
  hook, ...);
* prints one summary: which weights are low-rank (shapes, rank), which
  matched weights stayed full-rank and why, which rule matched each
  ``target_modules`` / ``exclude_modules`` entry, and the optimizer-state
  size against plain AdamW.

Then every training log gets ``galore/refreshes`` (basis refreshes so far,
one per weight), ``galore/refresh_seconds`` (time spent in them),
``galore/subspace_overlap`` (mean overlap between each refreshed basis and the
one it replaced since the previous log: 1 = same subspace; absent when no
basis was replaced), ``galore/optimizer_state_mb`` (bytes of all optimizer
state tensors) and ``galore/skipped_steps`` (steps skipped for a NaN/Inf
gradient). For a layer-wise optimizer the callback also refuses, at train
start, Trainer settings it cannot honour, and sets every training log's
``grad_norm`` to the global pre-clip norm the gradient hooks recorded (the
Trainer's own norm comes after the hooks freed every gradient); both through
public callback events only. At train end a layer-wise optimizer's gradient
hooks are removed, so the model outlives them; ``on_init_end`` wraps that Trainer's ``train`` so that an
exception ends them too (``hf_galore.trainer_guard``). ``import hf_galore`` adds the callback to every Trainer; it is
inert unless an hf_galore optimizer is in use, and several instances on one
Trainer act as one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch
from transformers import TrainerCallback

from .compat_transformers import check_optim_args_split
from .errors import GaLoreConfigError, UnsupportedSetupError
from .memory import STEP_BYTES, weight_state_bytes
from .optim import GaLoreAdamW, GaLoreOptimizer
from .optim.accumulation import accumulates_in_subspace
from .optim.base import claim_params, param_owner
from .optim.layerwise import LayerwiseOptimizer
from .projectors.geometry import effective_rank, projected_shape, sides_for
from .trainer_args import (
    EXPLICIT_PATH,
    check_optional_dependencies,
    config_from_training_args,
    hook_error,
    is_galore_optim,
    optim_name,
)
from .trainer_guard import (
    calling_trainer,
    end_layerwise_hooks,
    guard_train,
    is_hf_galore_optimizer,
    rearm_layerwise_hooks,
    unwrap_optimizer,
)
from .trainer_layerwise import check_subspace_accumulation_args, check_trainer_args, logged_grad_norm, loss_scaler

_OWNER_ATTR = "_hf_galore_callback"
_PEERS_ATTR = "_hf_galore_callbacks"
_LOGGED_ATTR = "_hf_galore_logged"  # the last `logs` dict a GaLoreCallback wrote into
MB = 2**20
_SUMMARY_KEYS = ("update_proj_gap", "projector", "proj_type", "quant", "refresh")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in ``optimizer.state_dict()['state']`` (moments, bases, steps)."""
    total = 0
    for per_param in optimizer.state_dict()["state"].values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                total += _nbytes(value)
    return total


def _release_stale_hooks(model: torch.nn.Module, optimizer: Any) -> None:
    """Make ``optimizer`` (any kind) the owner of weights an older layer-wise optimizer still hooks.

    The older hooks then ignore every gradient (see ``LayerwiseOptimizer``),
    whether or not that optimizer is still referenced somewhere.
    """
    if optimizer is None:
        return
    stale = [
        p
        for p in model.parameters()
        if isinstance(param_owner(p), LayerwiseOptimizer) and param_owner(p) is not optimizer
    ]
    if stale:
        claim_params(stale, optimizer)


# ------------------------------------------------------ state-size estimate
def estimate_state_bytes(optimizer: Any) -> int | None:
    """Optimizer-state bytes after the first refreshes, from shapes alone (``None`` for unknown members).

    Each weight is counted by ``hf_galore.memory.weight_state_bytes``, the
    formula ``estimate_memory`` uses, from the components' declarations (the
    base optimizer's ``state_layout``, the basis codec, the projector's and
    refresh policy's ``state_layout``), so the start-up summary, the estimator
    and the logged ``galore/optimizer_state_mb`` agree.
    """
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and is_hf_galore_optimizer(inner):  # e.g. LayerwiseOptimizer around GaLoreAdamW
        return estimate_state_bytes(inner)
    if not isinstance(optimizer, GaLoreOptimizer):
        return None
    total = 0
    basis_cache: dict = {}
    try:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    total += weight_state_bytes(type(optimizer), tuple(p.shape), p.dtype, group, basis_cache)
    except NotImplementedError:  # a member that declares no state layout
        return None
    return total


def adamw_state_bytes(optimizer: Any) -> int:
    """What ``torch.optim.AdamW`` would hold for the same parameters (two moments + a step each)."""
    return sum(
        STEP_BYTES + GaLoreAdamW.state_bytes(tuple(p.shape), p.dtype, {})
        for group in optimizer.param_groups
        for p in group["params"]
        if p.requires_grad
    )


# ------------------------------------------------------------------ summary
def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def _grouped(entries: list[tuple[str, tuple[int, ...], int | None]]) -> list[str]:
    counts = Counter((_pattern(n), s, r) for n, s, r in entries)
    lines = []
    for (pattern, shape, rank), count in counts.items():
        rank_text = f" rank {rank}" if rank is not None else ""
        times = f" x{count}" if count > 1 else ""
        lines.append(f"    {pattern}  {tuple(shape)}{rank_text}{times}")
    return lines


def build_summary(
    optimizer: Any,
    model: torch.nn.Module | None,
    plan: Any = None,
    name: str | None = None,
) -> str:
    """One start-up summary of what the optimizer projects and what its state costs."""
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    lowrank, full, total_params, lowrank_params = [], 0, 0, 0
    settings = None
    layerwise = isinstance(optimizer, LayerwiseOptimizer)
    accumulators = full_grads = 0  # bytes, over the weights that accumulate in their subspace
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            total_params += p.numel()
            if "rank" in group and p.dim() >= 2:
                shape = tuple(p.shape)
                matrix = (shape[0], math.prod(shape[1:]))
                lowrank.append(
                    (
                        names.get(id(p), "<unnamed>"),
                        shape,
                        effective_rank(group["rank"], matrix),
                    )
                )
                lowrank_params += p.numel()
                settings = settings or {k: group.get(k) for k in _SUMMARY_KEYS}
                if accumulates_in_subspace(group, layerwise):
                    sides = sides_for(group["proj_type"], matrix)
                    size = 4 if group.get("accumulate_dtype") == "float32" else p.element_size()
                    accumulators += math.prod(projected_shape(matrix, group["rank"], sides)) * size
                    full_grads += p.numel() * p.element_size()
            else:
                full += 1
    kind = type(optimizer).__name__
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and is_hf_galore_optimizer(inner):
        kind += f"({type(inner).__name__})"
    head = f"hf_galore: {kind}" + (f" (optim={name!r})" if name else "")
    if settings:
        head += (
            f", basis refresh every {settings['update_proj_gap']} steps (projector={settings['projector']!r}, "
            f"proj_type={settings['proj_type']!r}, quant={settings['quant']!r}, refresh={settings['refresh']!r})"
        )
    lines = [
        head,
        f"  low-rank: {len(lowrank)} weights projected, {lowrank_params:,} of {total_params:,} trainable parameters",
    ]
    lines += _grouped(lowrank)
    lines.append(f"  full rank: {full} tensors (embeddings, norms, biases, output head, unmatched modules)")
    if full_grads:
        lines.append(
            f"  gradient accumulation: in the subspace, {accumulators / MB:.2f} MB of accumulators instead of "
            f"{full_grads / MB:.2f} MB of full gradients (weights due for a refresh keep theirs at that step)"
        )
    elif lowrank:
        lines.append("  gradient accumulation: in full, in `.grad` (group key `accumulate`)")
    if plan is not None and plan.small:
        lines.append(f"  matched but full rank (smaller dimension <= rank {plan.rank}): {len(plan.small)} weights")
        lines += _grouped([(n, s, None) for n, s in plan.small])
    if plan is not None:
        lines += [f"  matching: {match.describe()}" for match in getattr(plan, "matches", ())]
        lines += [f"  note: {note}" for note in plan.notes]
    estimate, adamw = estimate_state_bytes(optimizer), adamw_state_bytes(optimizer)
    if estimate is not None and adamw:
        lines.append(
            f"  optimizer state: {estimate / MB:.2f} MB vs {adamw / MB:.2f} MB for AdamW "
            f"({estimate / adamw:.2f}x, from shapes)"
        )
    else:
        lines.append(f"  optimizer state: AdamW would hold {adamw / MB:.2f} MB")
    return "\n".join(lines)


#: ``RefreshStats`` counters logged as ``galore/<name>`` once they are non-zero (docs/projectors.md).
ROBUSTNESS_COUNTERS = (
    "fallbacks",
    "energy_fallbacks",
    "refresh_failures",
    "skipped_nonfinite",
    "state_resets",
    "dropped_bases",
)


class GaLoreCallback(TrainerCallback):
    """Start-up check and summary, and GaLore statistics in the Trainer's logs.

    Args:
        print_summary: print the start-up summary on the main process.
        log_stats: add the ``galore/*`` values to every training log.
    """

    def __init__(self, print_summary: bool = True, log_stats: bool = True) -> None:
        self.print_summary = print_summary
        self.log_stats = log_stats
        self.summary: str | None = None
        self._optimizer: Any = None
        self._overlap_seen = (0.0, 0)
        self._peers: list[GaLoreCallback] | None = None

    #: True for the instance ``import hf_galore`` adds to every Trainer; one passed by the user wins over it.
    auto_added = False

    # -------------------------------------------------------------- checks
    def on_init_end(self, args, state, control, model=None, **kwargs):
        """Bad GaLore settings fail at ``Trainer(...)``, before any data is touched."""
        if is_galore_optim(optim_name(args)) or is_hf_galore_optimizer(unwrap_optimizer(kwargs.get("optimizer"))):
            trainer = calling_trainer(self)
            if trainer is not None:  # hooks end and damaged checkpoint files are named however train() ends
                guard_train(trainer)
        peers = getattr(state, _PEERS_ATTR, None)
        if peers is None:
            peers = []
            setattr(state, _PEERS_ATTR, peers)
        peers.append(self)
        self._peers = peers
        if len(peers) > 1 or not is_galore_optim(optim_name(args)):
            return
        if is_hf_galore_optimizer(unwrap_optimizer(kwargs.get("optimizer"))):
            return  # built explicitly (`optimizers=`): its own config was checked then
        from .targets import plan_param_groups
        from .trainer_args import check_supported_engine

        check_supported_engine(args)
        config = config_from_training_args(args)
        check_optim_args_split(getattr(args, "optim_args", None))
        check_optional_dependencies(optim_name(args), config)
        if model is not None:
            plan_param_groups(model, config)

    def _acts(self, state) -> bool:
        """Exactly one GaLoreCallback per Trainer acts: the first passed by the user, else the automatic one."""
        if self._peers:
            chosen = next((cb for cb in self._peers if not cb.auto_added), self._peers[0])
            if chosen is not self:
                return False
        owner = getattr(state, _OWNER_ATTR, None)  # instances added after Trainer(...) have no peers
        if owner is not None and owner is not self:
            return False
        setattr(state, _OWNER_ATTR, self)
        return True

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._optimizer = None
        if not self._acts(state):
            return
        name = optim_name(args)
        inner = unwrap_optimizer(optimizer)
        ours = is_hf_galore_optimizer(inner)
        if model is not None:
            _release_stale_hooks(model, inner)
        rearm_layerwise_hooks(inner)  # removed when this Trainer's previous train() ended
        if is_galore_optim(name) and not ours:
            reason = hook_error()
            raise UnsupportedSetupError(
                f"`optim`={name!r} was set but the Trainer holds {type(inner).__name__}, not an hf_galore optimizer"
                + (f" (hook not installed: {reason})" if reason else "")
                + f". Training would not be GaLore. Build it explicitly: {EXPLICIT_PATH}"
            )
        if not ours:
            return
        if isinstance(inner, LayerwiseOptimizer):  # before any step: settings it cannot honour stop here
            check_trainer_args(inner, args, loss_scaler(optimizer))
        elif isinstance(inner, GaLoreOptimizer):
            check_subspace_accumulation_args(inner, args, loss_scaler(optimizer))
        self._optimizer = inner
        stats = inner.galore_stats
        self._overlap_seen = (stats.overlap_sum, stats.overlap_count)
        plan = getattr(inner, "galore_plan", None)
        if plan is None and is_galore_optim(name) and model is not None:
            import warnings

            from .targets import plan_param_groups

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # already warned when the optimizer was built
                try:
                    plan = plan_param_groups(model, config_from_training_args(args))
                except GaLoreConfigError:  # an optimizer passed in, built from other settings
                    plan = None
        self.summary = build_summary(inner, model, plan, name if is_galore_optim(name) else None)
        if self.print_summary and state.is_world_process_zero:
            print(self.summary, flush=True)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        """A layer-wise optimizer's gradient hooks end with the training that uses them (on an exception:
        ``trainer_guard.guard_train``).

        The model often outlives its Trainer (a notebook comparing optimizers
        on one model): hooks left on its weights would keep updating it in the
        next run's backward passes.
        """
        end_layerwise_hooks(self._optimizer if self._optimizer is not None else optimizer)

    # ---------------------------------------------------------------- logs
    def stats(self) -> dict[str, float]:
        """The ``galore/*`` values now (overlap: mean since the previous call)."""
        optimizer = self._optimizer
        stats = optimizer.galore_stats
        out = {
            "galore/refreshes": stats.refreshes,
            "galore/refresh_seconds": round(stats.refresh_seconds, 4),
            "galore/optimizer_state_mb": round(optimizer_state_bytes(optimizer) / MB, 4),
            # steps skipped for a NaN/Inf gradient (per weight in layer-wise mode); docs/optimizers.md
            "galore/skipped_steps": stats.skipped_steps,
        }
        # robustness events (docs/projectors.md), logged once they have happened
        for key in ROBUSTNESS_COUNTERS:
            if getattr(stats, key):
                out[f"galore/{key}"] = getattr(stats, key)
        seen_sum, seen_count = self._overlap_seen
        if stats.overlap_count > seen_count:
            out["galore/subspace_overlap"] = round(
                (stats.overlap_sum - seen_sum) / (stats.overlap_count - seen_count), 6
            )
        self._overlap_seen = (stats.overlap_sum, stats.overlap_count)
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The acting instance's values are written by the first GaLoreCallback that sees this log:
        # transformers puts callbacks passed by the user after the reporting integrations
        # (TensorBoard, W&B, ...), which would otherwise never see `galore/*`; the automatic
        # instance sits right after DefaultFlowCallback, before all of them.
        owner = getattr(state, _OWNER_ATTR, None)
        if owner is None or logs is None or getattr(state, _LOGGED_ATTR, None) is logs:
            return
        setattr(state, _LOGGED_ATTR, logs)
        if owner._optimizer is None:
            return
        if any(k.startswith(("eval_", "test_")) for k in logs):
            return
        if "train_runtime" in logs:  # the closing summary: the values at the end, so a short run logs them too
            if owner.log_stats:
                extra = owner.stats()
                logs.update(extra)
                if state.log_history and "train_runtime" in state.log_history[-1]:
                    state.log_history[-1].update(extra)
            return
        extra = owner.stats() if owner.log_stats else {}
        grad_norm = logged_grad_norm(owner._optimizer) if "loss" in logs else None
        if grad_norm is not None:  # layer-wise: the Trainer's own norm came after the hooks freed every gradient
            extra["grad_norm"] = grad_norm
        if not extra:
            return
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


class AutoGaLoreCallback(GaLoreCallback):
    """The instance ``import hf_galore`` adds to every Trainer (inert without an hf_galore optimizer)."""

    auto_added = True


__all__ = [
    "AutoGaLoreCallback",
    "GaLoreCallback",
    "adamw_state_bytes",
    "build_summary",
    "estimate_state_bytes",
    "is_hf_galore_optimizer",
    "optimizer_state_bytes",
    "unwrap_optimizer",
]
