"""GaLore on PyTorch's own distributed engines: DDP, layer-wise under DDP, FSDP2.

Three pieces, one per engine (docs/distributed.md walks through each):

* **DDP.** After the all-reduce every rank holds the same gradient, so every
  rank would compute the same basis. :func:`synchronize_bases` makes that true
  *by construction*: each new basis (refresh or online tracking) is broadcast
  from one rank before it is stored, so ranks cannot drift apart even where an
  SVD is not bit-reproducible (different BLAS threads, GPU solvers).
* **Layer-wise under DDP.** Post-accumulate-grad hooks fire *before* DDP
  reduces the gradient, so updating there would use each rank's local
  gradient. :func:`register_layerwise_ddp_hook` installs a DDP communication
  hook that reduces a bucket and then updates that bucket's weights with the
  reduced gradient, the scheme of torch's ``_hook_then_optimizer``.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``). Gradients and weights
  are ``DTensor`` row shards (``Shard(0)``). :func:`project_sharded_gradient`
  and :func:`apply_sharded_update` (called by ``optim/lowrank.py`` whenever a
  gradient is a DTensor) project each shard locally:

  - right basis ``Q`` (``G Q``): ``(G Q)_i = G_i Q``, no reduction; ``Q`` is
    stored as row shards and all-gathered on use (``n × r``, transient);
  - left basis ``P`` (``Pᵀ G``): ``P`` is stored as the row shard ``P_i``
    that matches ``W_i``; ``Pᵀ G = Σ_i P_iᵀ G_i`` is reduce-scattered by
    columns, so each rank keeps ``r × n/world`` moments; the update is
    all-gathered (``r × n``) and applied as ``W_i −= s · P_i N``.

  So moments *and* bases are sharded. The basis is refreshed by one rank
  (rank 0 of the shard group): the gradient shards of one weight are gathered
  there (never on every rank), the configured finder runs on the full matrix
  (the same SVD as one process, so the numbers match it), and the basis is
  broadcast; each rank keeps its shard.

Engines that flatten parameters (FSDP1 ``FlatParameter``, DeepSpeed ZeRO) hide
the matrix shape GaLore projects, so :func:`check_supported_engine` refuses
them at start and names what to use instead.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .errors import UnsupportedSetupError
from .optim import lowrank
from .optim.engines import register_engine
from .optim.members import follows_gradient
from .optim.schedules import get_refresh_policy
from .projectors import get_projector
from .projectors.geometry import effective_rank, sides_for, subspace_overlap
from .projectors.storage import get_codec

__all__ = [
    "FSDP2_ENGINE",
    "BroadcastBasisSync",
    "FSDP2Engine",
    "apply_sharded_update",
    "check_supported_engine",
    "is_sharded_tensor",
    "optimizer_state_bytes",
    "project_sharded_gradient",
    "register_layerwise_ddp_hook",
    "sharded_load_state_dict_pre_hook",
    "sharded_state_dict_post_hook",
    "synchronize_bases",
]


def _dist():
    import torch.distributed as dist

    return dist


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --------------------------------------------------------------------------- engines
_FSDP2_HINT = (
    "use FSDP2 instead: `fully_shard` from torch.distributed.fsdp, `fsdp_version: 2` in an "
    "accelerate config (examples/accelerate_configs/fsdp2.yaml), or `fsdp_config={'version': 2}` in "
    "TrainingArguments; DDP (examples/accelerate_configs/ddp.yaml) also works"
)


def _refuse(engine: str, why: str) -> None:
    raise UnsupportedSetupError(
        f"GaLore cannot run under {engine}: {why}. GaLore projects each 2-D weight's gradient onto a "
        f"low-rank subspace, so it needs the weights' matrix shape; {_FSDP2_HINT}. See docs/distributed.md."
    )


def check_supported_engine(obj: Any) -> None:
    """Refuse DeepSpeed ZeRO and FSDP1 (flat parameters) with a message saying what to use.

    ``obj`` may be an ``accelerate.Accelerator`` (or its ``AcceleratorState``),
    ``transformers.TrainingArguments``, a model (possibly wrapped), an
    optimizer, or an iterable of parameters. Anything else passes. Call it
    before building the optimizer: both engines flatten parameters into 1-D
    buffers (FSDP1 ``FlatParameter``, ZeRO partitions), where no matrix is
    left to project, and ZeRO also replaces the optimizer's step.
    """
    state = getattr(obj, "state", None)
    distributed_type = getattr(obj, "distributed_type", None) or getattr(
        state, "distributed_type", None
    )
    if distributed_type is not None:  # Accelerator / AcceleratorState / PartialState
        name = str(getattr(distributed_type, "value", distributed_type)).upper()
        if name == "DEEPSPEED":
            _refuse(
                "DeepSpeed",
                "ZeRO partitions flattened parameters and owns the optimizer step",
            )
        if name == "FSDP":
            plugin = getattr(obj, "fsdp_plugin", None) or getattr(
                state, "fsdp_plugin", None
            )
            if int(getattr(plugin, "fsdp_version", 1) or 1) < 2:
                _refuse(
                    "FSDP1 (`fsdp_version: 1`)",
                    "it flattens each wrapped module's weights into one FlatParameter",
                )
        return
    if hasattr(obj, "fsdp_config") and hasattr(obj, "deepspeed"):  # TrainingArguments
        if obj.deepspeed:
            _refuse(
                f"DeepSpeed (`deepspeed`={obj.deepspeed!r})",
                "ZeRO partitions flattened parameters and owns the optimizer step",
            )
        fsdp = obj.fsdp
        if fsdp and fsdp not in ("", []):
            version = int((obj.fsdp_config or {}).get("version", 2))
            if version < 2:
                _refuse(
                    "FSDP1 (`fsdp_config['version']`=1)",
                    "it flattens each wrapped module's weights into one FlatParameter",
                )
        return
    if isinstance(obj, torch.nn.Module):
        for module in obj.modules():
            cls = type(module).__name__
            if cls == "FullyShardedDataParallel":
                _refuse(
                    "FSDP1 (`FullyShardedDataParallel`)",
                    "it flattens each wrapped module's weights into one FlatParameter",
                )
            if cls in ("DeepSpeedEngine", "PipelineEngine"):
                _refuse(
                    "DeepSpeed",
                    "ZeRO partitions flattened parameters and owns the optimizer step",
                )
        params: Iterable[Any] = obj.parameters()
    elif isinstance(obj, torch.optim.Optimizer):
        params = [p for g in obj.param_groups for p in g["params"]]
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, dict)):
        params = obj
    else:
        return
    for p in params:
        if isinstance(p, dict):  # a param group
            for q in p.get("params", []):
                _check_param(q)
        else:
            _check_param(p)


def _check_param(p: Any) -> None:
    if getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter":
        _refuse(
            "FSDP1 (`FlatParameter`)",
            "it flattens each wrapped module's weights into one FlatParameter",
        )
    if hasattr(p, "ds_id") or hasattr(p, "ds_tensor"):
        _refuse(
            "DeepSpeed ZeRO-3",
            "it partitions flattened parameters and owns the optimizer step",
        )


# --------------------------------------------------------------------------- DDP
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

    def __call__(self, basis: torch.Tensor) -> torch.Tensor:
        basis = basis.contiguous()
        _dist().broadcast(basis, group=self.process_group, group_src=self.src)
        return basis


def synchronize_bases(
    optimizer: torch.optim.Optimizer, process_group: Any = None, src: int = 0
) -> torch.optim.Optimizer:
    """Make every data-parallel rank use the same basis, by broadcasting it from ``src``.

    Call once after building the optimizer under DDP (the Trainer integration
    does it for you). A no-op when torch.distributed is not initialized or
    the group has one rank. Works for a layer-wise wrapper too: every inner
    GaLore optimizer it exposes (``optimizers`` / ``optimizer``) is set.
    Returns ``optimizer`` for chaining.
    """
    if not _initialized() or _dist().get_world_size(process_group) < 2:
        return optimizer
    sync = BroadcastBasisSync(process_group, src)
    for opt in _galore_optimizers(optimizer):
        opt.basis_sync = sync
    return optimizer


def _galore_optimizers(optimizer: Any) -> list[Any]:
    from .optim.base import GaLoreOptimizer

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
    dist = _dist()
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
        world = dist.get_world_size(process_group)
        buffer = bucket.buffer()
        buffer.div_(world)
        dist.all_reduce(buffer, group=process_group, async_op=True).get_future().wait()
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
    if hasattr(step_param, "update_param") and hasattr(
        step_param, "param_groups"
    ):  # LayerwiseOptimizer
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


# --------------------------------------------------------------------------- FSDP2
def is_sharded_tensor(tensor: Any) -> bool:
    """``True`` for a ``DTensor`` (FSDP2 / tensor-parallel parameter or gradient)."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return False
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class _Rows:
    """Where this rank's row shard of a ``Shard(0)`` DTensor lies, and the group it is sharded over."""

    __slots__ = ("group", "mesh", "mesh_dim", "rank", "world")

    def __init__(self, tensor: Any) -> None:
        from torch.distributed.tensor import Replicate, Shard

        mesh = tensor.device_mesh
        shard_dims = [
            i for i, pl in enumerate(tensor.placements) if isinstance(pl, Shard)
        ]
        ok = len(shard_dims) == 1 and tensor.placements[shard_dims[0]].dim == 0
        ok = ok and all(
            isinstance(pl, Replicate)
            for i, pl in enumerate(tensor.placements)
            if i != shard_dims[0]
        )
        if not ok:
            raise UnsupportedSetupError(
                f"GaLore under DTensor supports row sharding (FSDP2's `Shard(0)`, optionally with `Replicate()` "
                f"for HSDP), got placements {tensor.placements!r}; exclude tensor-parallel weights from "
                "`target_modules`"
            )
        dim = shard_dims[0]
        self.mesh, self.mesh_dim = mesh, dim
        self.group = mesh.get_group(dim)
        self.rank = mesh.get_local_rank(dim)
        self.world = mesh.size(dim)

    def bounds(self, size: int, index: int | None = None) -> tuple[int, int]:
        """``torch.chunk`` bounds, as DTensor's ``Shard`` lays rows out."""
        index = self.rank if index is None else index
        chunk = math.ceil(size / self.world) if size else 0
        start = min(index * chunk, size)
        return start, min(start + chunk, size)

    def as_dtensor(self, local: torch.Tensor, shape: tuple[int, ...], dim: int) -> Any:
        """This rank's ``local`` chunk of a global tensor of ``shape`` split along ``dim`` (``torch.chunk`` layout)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        placements = [Replicate()] * self.mesh.ndim
        placements[self.mesh_dim] = Shard(dim)
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        return DTensor.from_local(
            local,
            self.mesh,
            placements,
            run_check=False,
            shape=torch.Size(shape),
            stride=stride,
        )

    def chunk(self, size: int) -> int:
        return math.ceil(size / self.world) if size else 0

    # -- collectives on row-sharded 2-D tensors (dim 0 split with torch.chunk) --
    def _padded(self, local: torch.Tensor, rows: int) -> torch.Tensor:
        if local.shape[0] == rows:
            return local.contiguous()
        out = local.new_zeros((rows, *local.shape[1:]))
        out[: local.shape[0]] = local
        return out

    def all_gather_rows(self, local: torch.Tensor, size: int) -> torch.Tensor:
        rows = self.chunk(size)
        parts = [local.new_empty((rows, *local.shape[1:])) for _ in range(self.world)]
        _dist().all_gather(parts, self._padded(local, rows), group=self.group)
        return torch.cat(parts)[:size]

    def gather_rows(self, local: torch.Tensor, size: int) -> torch.Tensor | None:
        """The full tensor on rank 0 of the group, ``None`` elsewhere."""
        rows = self.chunk(size)
        parts = (
            [local.new_empty((rows, *local.shape[1:])) for _ in range(self.world)]
            if self.rank == 0
            else None
        )
        _dist().gather(self._padded(local, rows), parts, group=self.group, group_dst=0)
        return torch.cat(parts)[:size] if parts is not None else None

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        _dist().broadcast(tensor, group=self.group, group_src=0)
        return tensor

    def all_true(self, flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        _dist().all_reduce(value, op=_dist().ReduceOp.MIN, group=self.group)
        return bool(value.item())

    def all_gather_cols(self, local: torch.Tensor, size: int) -> torch.Tensor:
        return self.all_gather_rows(local.t(), size).t()

    def reduce_scatter_cols(self, full: torch.Tensor) -> torch.Tensor:
        """Sum ``full`` (``r × n``) over ranks; keep this rank's column chunk."""
        n = full.shape[1]
        cols = self.chunk(n)
        parts = []
        for k in range(self.world):
            a, b = self.bounds(n, k)
            part = full.new_zeros((full.shape[0], cols))
            part[:, : b - a] = full[:, a:b]
            parts.append(part)
        out = full.new_empty((full.shape[0], cols))
        _dist().reduce_scatter(out, parts, group=self.group)
        a, b = self.bounds(n)
        return out[
            :, : b - a
        ].contiguous()  # base updates may assume dense moments-shaped gradients


def _global_matrix_shape(tensor: Any) -> tuple[int, int]:
    shape = tuple(tensor.shape)
    return (shape[0], math.prod(shape[1:]))


def _local_matrix(tensor: Any) -> torch.Tensor:
    local = tensor.to_local()
    return local.reshape(local.shape[0], -1) if local.dim() != 2 else local


def _basis_shard(rows: _Rows, full: torch.Tensor) -> torch.Tensor:
    a, b = rows.bounds(full.shape[0])
    return full[a:b].clone(memory_format=torch.contiguous_format)


def _version(value: Any) -> Any:
    return (
        (id(value), value._version)
        if isinstance(value, torch.Tensor)
        else ("value", repr(value))
    )


def _share_state(rows: _Rows, state: dict, before: dict[str, Any] | None) -> None:
    """Copy every ``state`` entry rank 0's finder added or changed to the other ranks.

    Finders may keep per-weight state (an online-PCA optimizer's moments, a
    generator's position). It is computed on rank 0 only; replicating it keeps
    every rank's state dict alike, which checkpointing (and a later owner)
    relies on.
    """
    dist = _dist()
    meta = None
    if rows.rank == 0:
        meta = []
        for key, value in state.items():
            if before is not None and before.get(key) == _version(value):
                continue
            if isinstance(value, torch.Tensor):
                meta.append((key, tuple(value.shape), value.dtype))
            else:
                meta.append((key, None, value))
    box = [meta]
    dist.broadcast_object_list(box, group=rows.group, group_src=0)
    for key, shape, info in box[0]:
        if shape is None:
            state[key] = info
            continue
        tensor = (
            state[key].contiguous()
            if rows.rank == 0
            else torch.empty(shape, dtype=info)
        )
        wire = tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor
        dist.broadcast(wire, group=rows.group, group_src=0)
        if rows.rank != 0:
            state[key] = tensor


def _on_owner(
    rows: _Rows,
    compute: Callable[[], list[torch.Tensor] | None],
    shapes: list[tuple[int, int]],
    state: dict,
):
    """Run ``compute`` on rank 0 and broadcast its float32 results; ``None`` on every rank if it failed.

    Whatever the finder wrote into ``state`` on rank 0 is replicated too.
    """
    results = None
    if rows.rank == 0:
        before = {key: _version(value) for key, value in state.items()}
        results = compute()
        if results is not None and not all(
            bool(torch.isfinite(r).all()) for r in results
        ):
            results = None
    _share_state(rows, state, before if rows.rank == 0 else None)
    if not rows.all_true(results is not None or rows.rank != 0):
        return None
    if rows.rank != 0:
        results = [torch.empty(shape, dtype=torch.float32) for shape in shapes]
    return [rows.broadcast(r.float()) for r in results]


def _refresh_sharded(rows, local, shape, state, group, step, stats, dtype) -> None:
    """:func:`hf_galore.optim.lowrank.refresh_basis` for a row-sharded gradient (same semantics).

    Only rank 0 of the shard group sees the full gradient; the finder (and the
    randomized fallback if it fails) runs there, so per-weight finder state
    (e.g. a random generator) lives on rank 0, as it would in one process.
    """
    if not rows.all_true(bool(torch.isfinite(local).all())):
        stats.skipped_nonfinite += 1
        stats.warn_once(
            "nonfinite",
            "GaLore: non-finite gradient at a refresh step; kept the previous basis",
        )
        return
    finder = get_projector(group["projector"])
    codec = get_codec(group["quant"])
    policy = get_refresh_policy(group["refresh"])
    sides = sides_for(group["proj_type"], shape)
    rank = effective_rank(group["rank"], shape)
    started = time.perf_counter()
    olds = []
    for side in sides:
        old = codec.decode(state, lowrank.basis_key(side))
        olds.append(
            None
            if old is None
            else rows.all_gather_rows(old.float(), _side_size(side, shape))
        )
    full = rows.gather_rows(
        local.float(), shape[0]
    )  # one full gradient, on rank 0 only
    energy_fallbacks = int(state.get("energy_fallbacks", 0))  # rank 0's count reaches every rank's state

    def compute():
        news = []
        for side, old in zip(sides, olds):
            try:
                new = finder.find(
                    full, rank, side, previous=old, state=state, group=group
                )
                if not bool(torch.isfinite(new).all()):
                    raise FloatingPointError("the new basis is not finite")
            except (RuntimeError, FloatingPointError) as exc:
                new = lowrank._fallback_basis(
                    full, rank, side, old, step, group, stats, exc
                )
                if new is None:
                    return None
            news.append(new)
        return news

    news = _on_owner(
        rows, compute, [(_side_size(side, shape), rank) for side in sides], state
    )
    full = None  # release the gathered gradient before storing
    if news is None:
        if rows.rank != 0:
            stats.refresh_failures += 1
        return
    if group.get("rotate_moments") and all(old is not None for old in olds):
        lowrank.rotate_moments_(
            state,
            [(side, new.t() @ old) for side, old, new in zip(sides, olds, news)],
            stats,
        )
    policy.after_refresh(state, group, step, list(olds), list(news))
    for side, old, new in zip(sides, olds, news):
        if old is not None:
            stats.record_overlap(subspace_overlap(old, new))
        codec.encode(
            state, lowrank.basis_key(side), _basis_shard(rows, new), dtype, group=group
        )
    stats.refreshes += 1
    stats.energy_fallbacks += int(state.get("energy_fallbacks", 0)) - energy_fallbacks
    stats.refresh_seconds += time.perf_counter() - started


def _side_size(side: str, shape: tuple[int, int]) -> int:
    return shape[0] if side == "left" else shape[1]


def _track_sharded(rows, local, shape, state, group, dtype) -> None:
    """Online finders move the basis every step; they need the full gradient, on rank 0."""
    finder = get_projector(group["projector"])
    codec = get_codec(group["quant"])
    sides = sides_for(group["proj_type"], shape)
    bases = []
    for side in sides:
        size = shape[0] if side == "left" else shape[1]
        bases.append(
            rows.all_gather_rows(
                codec.decode(state, lowrank.basis_key(side)).float(), size
            )
        )
    full = rows.gather_rows(local.float(), shape[0])

    def compute():
        return [
            finder.track(full, b, side, state=state, group=group)
            for side, b in zip(sides, bases)
        ]

    moved = _on_owner(rows, compute, [tuple(b.shape) for b in bases], state)
    if moved is None:
        return
    for side, new in zip(sides, moved):
        codec.encode(
            state, lowrank.basis_key(side), _basis_shard(rows, new), dtype, group=group
        )


def project_sharded_gradient(
    param: Any, grad: Any, state: dict, group: dict, stats: Any, step_flag: Any = None
) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """FSDP2 counterpart of :func:`hf_galore.optim.lowrank.project_gradient` for a ``Shard(0)`` DTensor.

    Returns this rank's part of the low-rank gradient (``G_i Q`` rows, or a
    column chunk of ``Pᵀ G``; ``Pᵀ G Q`` whole for ``proj_type="full"``) and
    the bases :func:`apply_sharded_update` needs. Every rank must call it for
    the same weights in the same order (collectives inside), which the
    optimizer's loop guarantees. ``step_flag`` (see ``lowrank.project_gradient``)
    is read when a refresh is due: a step skipped for a NaN/Inf gradient keeps
    the basis (the flag is the same on every rank, so the collectives match).
    """
    rows = _Rows(grad)
    shape = _global_matrix_shape(grad)
    local = _local_matrix(grad)
    sides = sides_for(group["proj_type"], shape)
    step = int(state["step"])
    bases = lowrank.load_bases(state, group, sides)
    policy = get_refresh_policy(group["refresh"])
    if bases is None:
        policy.setup(state, group, param)
    elif lowrank.projects_before_tracking(group):
        # OSD's order (see ``lowrank.project_gradient``): project with P_t, then move it
        low, used = _project_sharded(rows, local, shape, sides, bases)
        if policy.due(state, group, step):
            if not _skipped(step_flag):
                _refresh_sharded(rows, local, shape, state, group, step, stats, param.dtype)
        else:
            _track_sharded(rows, local, shape, state, group, param.dtype)
        return low, used
    if bases is None or policy.due(state, group, step):
        if not _skipped(step_flag):
            _refresh_sharded(rows, local, shape, state, group, step, stats, param.dtype)
        bases = lowrank.load_bases(state, group, sides)
        if bases is None:
            return None
    elif get_projector(group["projector"]).tracks_every_step:
        _track_sharded(rows, local, shape, state, group, param.dtype)
        bases = lowrank.load_bases(state, group, sides)
    return _project_sharded(rows, local, shape, sides, bases)


def _skipped(step_flag: Any) -> bool:
    """Whether this step is skipped for a NaN/Inf gradient (a host read, at refresh steps only)."""
    if step_flag is None:
        return False
    found_inf = step_flag()
    return found_inf is not None and bool(found_inf)


def _project_sharded(rows, local, shape, sides, bases) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """This rank's part of the low-rank gradient and the bases :func:`apply_sharded_update` needs."""
    used = []
    for side, basis in zip(sides, bases):
        # left: this rank's rows P_i; right: Q gathered on use (sharded at rest)
        used.append(basis if side == "left" else rows.all_gather_rows(basis, shape[1]))
    casted = [b.to(local.dtype) for b in used]
    if sides == ("right",):
        return local @ casted[0], used
    if sides == ("left",):
        return rows.reduce_scatter_cols(casted[0].t() @ local), used
    low = casted[0].t() @ local @ casted[1]
    _dist().all_reduce(low, group=rows.group)
    return low, used


def apply_sharded_update(
    param: Any, update: torch.Tensor, bases: list[torch.Tensor], group: dict
) -> None:
    """``W_i −= scale · back(update)_i`` on this rank's rows of a DTensor weight, in place."""
    rows = _Rows(param)
    shape = _global_matrix_shape(param)
    target = param.to_local()
    target = target if target.dim() == 2 else target.view(target.shape[0], -1)
    sides = sides_for(group["proj_type"], shape)
    casted = [b.to(target.dtype) for b in bases]
    update = update.to(target.dtype)
    alpha = -group["scale"]
    if sides == ("right",):
        target.addmm_(update, casted[0].t(), alpha=alpha)
    elif sides == ("left",):
        target.addmm_(casted[0], rows.all_gather_cols(update, shape[1]), alpha=alpha)
    else:
        target.addmm_(casted[0] @ update, casted[1].t(), alpha=alpha)


# ------------------------------------------------------------------ checkpoints
def _sharded_state_layouts(
    param: Any, group: dict, moment_keys: Iterable[str]
) -> tuple[_Rows, dict[str, tuple[tuple[int, int], int]]]:
    """Global shape and split dimension of each low-rank state key this module keeps as a local shard.

    ``moment_keys``: the base optimizer's keys that follow the gradient (``members.follows_gradient``).
    """
    rows = _Rows(param)
    m, n = _global_matrix_shape(param)
    sides = sides_for(group["proj_type"], (m, n))
    r = effective_rank(group["rank"], (m, n))
    layouts: dict[str, tuple[tuple[int, int], int]] = {}
    if group.get("quant") is None:  # dense bases: row shards of (k, r)
        for side in sides:
            layouts[lowrank.basis_key(side)] = ((_side_size(side, (m, n)), r), 0)
    if sides == ("right",):  # G_i Q: rows
        moment = ((m, r), 0)
    elif sides == ("left",):  # column chunk of Pᵀ G
        moment = ((r, n), 1)
    else:  # r x r, replicated: identical on every rank, already checkpoint-safe
        moment = None
    if moment is not None:
        for key in moment_keys:
            layouts[key] = moment
    return rows, layouts


def sharded_state_dict_post_hook(
    optimizer: torch.optim.Optimizer, state_dict: dict
) -> dict:
    """``Optimizer.state_dict`` post-hook: show FSDP2 low-rank shards as ``DTensor`` s.

    The low-rank moments and bases of a ``Shard(0)`` weight are plain local
    tensors during training (each rank its own rows or columns).
    ``torch.distributed.checkpoint`` (and accelerate's FSDP2 checkpoints built
    on it) would take plain tensors for replicated ones and keep one rank's
    copy; as DTensors with their true global shape they are saved, resharded
    and gathered (``full_state_dict=True``) correctly. The live state is not
    touched: entries are copied before values are replaced, and the DTensors
    share the live storage. States of other layouts (8-bit blocks, factored
    Adafactor statistics, quantized bases) stay local.
    """
    packed = state_dict["state"]
    for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        if "rank" not in group:
            continue
        for param, pid in zip(group["params"], saved["params"]):
            if pid not in packed or not is_sharded_tensor(param):
                continue
            rows, layouts = _sharded_state_layouts(param, group, follows_gradient(type(optimizer)))
            entry = dict(packed[pid])
            for key, (shape, dim) in layouts.items():
                value = entry.get(key)
                if (
                    not isinstance(value, torch.Tensor)
                    or is_sharded_tensor(value)
                    or value.dim() != 2
                ):
                    continue
                a, b = rows.bounds(shape[dim])
                expected = (b - a, shape[1]) if dim == 0 else (shape[0], b - a)
                if tuple(value.shape) == expected:
                    entry[key] = rows.as_dtensor(value, shape, dim)
            packed[pid] = entry
    return state_dict


def sharded_load_state_dict_pre_hook(
    optimizer: torch.optim.Optimizer, state_dict: dict
) -> dict:
    """``Optimizer.load_state_dict`` pre-hook: back to this rank's local shards (inverse of the post-hook)."""
    packed = state_dict["state"]
    for saved in state_dict["param_groups"]:
        if "rank" not in saved:
            continue
        for pid in saved["params"]:
            entry = packed.get(pid)
            if not entry or not any(is_sharded_tensor(v) for v in entry.values()):
                continue
            packed[pid] = {
                k: (v.to_local() if is_sharded_tensor(v) else v)
                for k, v in entry.items()
            }
    return state_dict


# --------------------------------------------------------------------------- measuring
def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state held by *this* rank, split into bases / low-rank moments / full-rank.

    DTensor states count their local shard only. Used by the tests and by
    ``benchmarks/distributed_state.py`` to show that FSDP2 shards everything.
    """
    out = {"bases": 0, "lowrank_moments": 0, "full_rank": 0}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor) or key == "step":
                    continue
                local = value.to_local() if is_sharded_tensor(value) else value
                nbytes = local.numel() * local.element_size()
                if key.startswith("basis_"):
                    out["bases"] += nbytes
                elif "rank" in group:
                    out["lowrank_moments"] += nbytes
                else:
                    out["full_rank"] += nbytes
    out["total"] = sum(out.values())
    return out


class FSDP2Engine:
    """The FSDP2 engine the algorithm calls for ``DTensor`` shards (``hf_galore.optim.engines``).

    The same refresh / projection / update as on one device, run on this
    rank's row shard: bases are computed from the gathered gradient where a
    refresh needs it, projected and applied shard by shard.
    """

    def handles(self, tensor: Any) -> bool:
        return is_sharded_tensor(tensor)

    def project_gradient(self, param, grad, state, group, stats, *, step_flag=None):
        return project_sharded_gradient(param, grad, state, group, stats, step_flag=step_flag)

    def apply_update(self, param, update, bases, group) -> None:
        apply_sharded_update(param, update, bases, group)

    def state_dict_post_hook(self, optimizer, state_dict):
        return sharded_state_dict_post_hook(optimizer, state_dict)

    def load_state_dict_pre_hook(self, optimizer, state_dict):
        return sharded_load_state_dict_pre_hook(optimizer, state_dict)


FSDP2_ENGINE = register_engine(FSDP2Engine())
