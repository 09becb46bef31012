"""DDP: every rank uses one basis, by construction, and layer-wise updates run on reduced gradients.

* **Basis broadcast.** After the all-reduce every rank holds the same
  gradient, so every rank would compute the same basis, but an SVD is not
  bit-reproducible everywhere (BLAS threads, GPU solvers). Each new basis
  (refresh or online tracking) is broadcast from one rank before it is
  stored (:class:`BroadcastBasisSync`). The optimizer switches it on itself
  (:class:`DDPEngine`, asked at its first low-rank step) when a
  ``DistributedDataParallel`` module of two or more ranks wraps its weights,
  in a plain loop or under the Trainer, with or without ``GaLoreCallback``. :func:`synchronize_bases` sets it explicitly
  (another group or source rank) or turns it off.
* **Layer-wise under DDP.** Post-accumulate-grad hooks fire *before* DDP
  reduces the gradient, so updating there would use each rank's local
  gradient. :func:`register_layerwise_ddp_hook` installs a DDP communication
  hook that reduces a bucket and then updates that bucket's weights with the
  reduced gradient, the scheme of torch's ``_hook_then_optimizer``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import UnsupportedSetupError
from ..optim.engines import engine_for, register_engine
from ._shards import dist, flag_device, initialized


class BroadcastBasisSync:
    """Callable ``basis -> basis`` that replaces every rank's basis with ``src``'s.

    ``optim/lowrank.py`` calls it on each float32 basis a finder returns (at a
    refresh or an online tracking step), before the basis is stored, so
    refresh policies, statistics and storage codecs all see the same tensor
    on every rank. The cost is one ``r × min(m, n)`` broadcast per weight per
    refresh, tiny next to DDP's gradient all-reduce.
    """

    def __init__(self, process_group: Any = None, src: int = 0) -> None:
        self.process_group = process_group
        self.src = src

    def __deepcopy__(self, memo: dict) -> BroadcastBasisSync:
        """A copied optimizer broadcasts over the same process group (a process-wide handle, not data)."""
        return self

    def __reduce__(self) -> tuple:
        """Picklable over the default process group (the unpickling process's own); a custom group is not."""
        if self.process_group is not None:
            raise TypeError(
                "a basis broadcast over a custom process group cannot be pickled; pickle the optimizer after "
                "`synchronize_bases(optimizer, enabled=False)`, then call `synchronize_bases(optimizer, group)` "
                "again where it is unpickled"
            )
        return (BroadcastBasisSync, (None, self.src))

    def __call__(self, basis: torch.Tensor) -> torch.Tensor:
        basis = basis.contiguous()
        dist().broadcast(basis, group=self.process_group, group_src=self.src)
        return basis

    def agree(self, flag: bool) -> bool:
        """``flag`` on every rank of the group (so a refresh that failed on one rank fails on all of them)."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=flag_device(self.process_group))
        dist().all_reduce(value, op=dist().ReduceOp.MIN, group=self.process_group)
        return bool(value.item())


def synchronize_bases(
    optimizer: torch.optim.Optimizer, process_group: Any = None, src: int = 0, *, enabled: bool = True
) -> torch.optim.Optimizer:
    """Broadcast every new basis from ``src`` (``enabled=True``), or never (``enabled=False``).

    Not needed under DDP: the optimizer switches the broadcast on by itself
    (DDP's process group, rank 0) when DDP wraps the weights. Call it for another
    ``process_group`` or ``src``, or with ``enabled=False`` to keep each
    rank's own basis (e.g. ranks that share a process group but train
    different models, or to measure what the broadcast prevents). A no-op
    (``enabled=True``) when torch.distributed is not initialized or the
    group has one rank. Works for a layer-wise wrapper too: every inner
    GaLore optimizer it exposes (``optimizers`` / ``optimizer``) is set.
    Returns ``optimizer`` for chaining.
    """
    if enabled not in (True, False):
        raise ValueError(f"`enabled` must be True or False, got {enabled!r}")
    targets = _galore_optimizers(optimizer)
    if not enabled:
        for opt in targets:
            opt.basis_sync, opt.basis_sync_decided = None, True
        return optimizer
    if not initialized() or dist().get_world_size(process_group) < 2:
        return optimizer
    sync = BroadcastBasisSync(process_group, src)
    for opt in targets:
        opt.basis_sync, opt.basis_sync_decided = sync, True
    return optimizer


def _galore_optimizers(optimizer: Any) -> list[Any]:
    from ..optim.base import GaLoreOptimizer

    found, todo, seen = [], [optimizer], set()
    while todo:
        opt = todo.pop()
        if id(opt) in seen:
            continue
        seen.add(id(opt))
        if isinstance(opt, GaLoreOptimizer):
            found.append(opt)
        for attr in ("optimizer", "inner", "base_optimizer"):
            inner = getattr(opt, attr, None)
            if inner is not None and inner is not opt:
                todo.append(inner)
        inners = getattr(opt, "optimizers", None)
        if isinstance(inners, dict):
            todo.extend(inners.values())
        elif isinstance(inners, (list, tuple)):
            todo.extend(inners)
    if not found:
        raise UnsupportedSetupError(
            f"expected a GaLore optimizer (GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor or their layer-wise "
            f"wrapper), got {type(optimizer).__name__}"
        )
    return found


def register_layerwise_ddp_hook(
    ddp_model: Any,
    step_param: Callable[[torch.Tensor, torch.Tensor], None] | Any,
    params: Iterable[torch.Tensor] | None = None,
) -> None:
    """Update each weight right after DDP has all-reduced its gradient bucket.

    ``step_param`` is a ``LayerwiseOptimizer`` built with
    ``register_hooks=False`` (its ``update_param`` then runs on the reduced
    gradient: clipping, norms and step counting as in one process), a GaLore
    optimizer (its ``update_params`` runs with the param's group), or any
    callable ``(param, reduced_grad)``. Only ``params`` (default: all that ``step_param`` can place) are
    updated in the hook; their ``.grad`` is set to ``None`` at the end of
    backward, as layer-wise mode frees gradients.

    The hook waits for the bucket's all-reduce and updates in the autograd
    thread, so updates run in a fixed order on every rank. Under ``no_sync()``
    (gradient accumulation) DDP calls no communication hook, so the update
    happens once, on the synchronizing backward, with the accumulated and
    reduced gradient. A weight is touched only after its gradient is complete,
    i.e. after every backward node that reads it has run.

    Memory: DDP's bucket buffers hold one full gradient copy whatever we do,
    so under DDP layer-wise mode saves the optimizer-step peak, not the
    gradient buffers (use ``gradient_as_bucket_view=True`` so that ``.grad``
    adds no second copy).
    """
    comm = dist()
    if not hasattr(ddp_model, "register_comm_hook"):
        raise UnsupportedSetupError(
            f"`ddp_model` must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp_model).__name__}"
        )
    step = _as_step_param(step_param)
    owned = None if params is None else {id(p) for p in params}
    if owned is None and hasattr(step_param, "param_groups"):
        owned = {id(p) for g in step_param.param_groups for p in g["params"]}
    ddp_ref = weakref.ref(ddp_model)
    pending = {"queued": False}

    def _free_grads() -> None:
        pending["queued"] = False
        model = ddp_ref()
        if model is None:
            return
        for p in model.module.parameters():
            if owned is None or id(p) in owned:
                p.grad = None

    # No annotations: DDP checks them against dist.GradBucket / Future[Tensor], and
    # ``from __future__ import annotations`` turns them into strings.
    def hook(process_group, bucket):
        world = comm.get_world_size(process_group)
        buffer = bucket.buffer()
        buffer.div_(world)
        comm.all_reduce(buffer, group=process_group, async_op=True).get_future().wait()
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            if owned is None or id(p) in owned:
                step(p, g)
        if not pending["queued"]:
            pending["queued"] = True
            # DDP queues its own end-of-backward callback (which writes the reduced
            # buckets into ``.grad``) after the last bucket's hook: re-queueing once
            # runs the release after it.
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: engine.queue_callback(_free_grads))
        fut = torch.futures.Future()
        fut.set_result(buffer)
        return fut

    ddp_model.register_comm_hook(ddp_model.process_group, hook)


def _as_step_param(step_param: Any) -> Callable[[torch.Tensor, torch.Tensor], None]:
    if hasattr(step_param, "update_param") and hasattr(step_param, "param_groups"):  # LayerwiseOptimizer
        layerwise = step_param

        def step(param: torch.Tensor, grad: torch.Tensor) -> None:
            param.grad = grad  # the reduced gradient (a view of DDP's bucket)
            layerwise.update_param(param)

        return step
    if hasattr(step_param, "update_params") and hasattr(step_param, "param_groups"):
        optimizer = step_param
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}

        def step(param: torch.Tensor, grad: torch.Tensor) -> None:
            group = group_of.get(id(param))
            if group is not None:
                optimizer.update_params(group, [param], [grad])

        return step
    if callable(step_param):
        return step_param
    raise UnsupportedSetupError(
        f"`step_param` must be a callable (param, grad) or a GaLore optimizer, got {type(step_param).__name__}"
    )


def ddp_wrapping(params: list[Any]) -> Any:
    """The live ``DistributedDataParallel`` module that holds any of ``params``, else ``None``.

    DDP marks nothing on the parameters it wraps, so its instances are looked
    up among the objects the garbage collector tracks: once per optimizer,
    and only in a process group of two or more ranks. Needs no collective, so
    an optimizer that only some ranks step (a one-rank reference run, a
    pipeline stage) never waits for the others.
    """
    import gc

    from torch.nn.parallel import DistributedDataParallel

    wanted = {id(p) for p in params}
    for obj in gc.get_objects():
        if isinstance(obj, DistributedDataParallel) and any(id(p) in wanted for p in obj.module.parameters()):
            return obj
    return None


class DDPEngine:
    """The engine that turns the basis broadcast on under DDP (``hf_galore.optim.engines``).

    It owns no tensor (DDP's weights are plain tensors: the local placement
    runs them); it only answers, once per optimizer at its first low-rank
    step, whether a ``DistributedDataParallel`` module wraps the weights, and
    then returns a broadcast over that module's process group.
    """

    def handles(self, tensor: Any) -> bool:
        return False

    def placement(self, tensor: Any, group: dict) -> Any:
        raise UnsupportedSetupError(f"the DDP engine owns no tensor, got {type(tensor).__name__}")

    def basis_sync_for(self, params: list[Any], grads: list[Any]) -> BroadcastBasisSync | None:
        if not params or not initialized() or dist().get_world_size() < 2:
            return None
        if any(engine_for(t) is not None for t in (*params, *grads)):  # sharded weights: their engine's business
            return None
        ddp = ddp_wrapping(params)
        if ddp is None or dist().get_world_size(ddp.process_group) < 2:
            return None
        return BroadcastBasisSync(ddp.process_group)

    def state_dict_post_hook(self, optimizer: Any, state_dict: dict) -> None:
        return None

    def load_state_dict_pre_hook(self, optimizer: Any, state_dict: dict) -> None:
        return None


DDP_ENGINE = register_engine(DDPEngine())

__all__ = [
    "DDP_ENGINE",
    "BroadcastBasisSync",
    "DDPEngine",
    "ddp_wrapping",
    "register_layerwise_ddp_hook",
    "synchronize_bases",
]
