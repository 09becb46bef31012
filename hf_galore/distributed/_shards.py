"""What the FSDP2 engine and its checkpoint hooks share: where a ``Shard(0)`` DTensor's rows lie, and collectives on them."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import UnsupportedSetupError


def dist():
    """``torch.distributed``, imported on use (builds without it import this package all the same)."""
    import torch.distributed as dist

    return dist


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def flag_device(process_group: Any = None) -> torch.device:
    """Where a small control tensor (a flag, a count) must live for ``process_group``'s backend."""
    if dist().get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shards_bases(group: dict) -> bool:
    """Dense bases are kept as row shards; quantized ones whole on every rank.

    A quantized codec quantizes the flattened basis in groups, so a row shard
    would be quantized with other group boundaries than one process uses;
    whole, the stored codes are one process's, identical on every rank
    (and so checkpoint-safe as plain tensors).
    """
    return group.get("quant") is None


def is_sharded_tensor(tensor: Any) -> bool:
    """``True`` for a ``DTensor`` (FSDP2 / tensor-parallel parameter or gradient)."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return False
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class Rows:
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
        dist().all_gather(parts, self._padded(local, rows), group=self.group)
        return torch.cat(parts)[:size]

    def gather_rows(self, local: torch.Tensor, size: int) -> torch.Tensor | None:
        """The full tensor on rank 0 of the group, ``None`` elsewhere."""
        rows = self.chunk(size)
        parts = (
            [local.new_empty((rows, *local.shape[1:])) for _ in range(self.world)]
            if self.rank == 0
            else None
        )
        dist().gather(self._padded(local, rows), parts, group=self.group, group_dst=0)
        return torch.cat(parts)[:size] if parts is not None else None

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        dist().broadcast(tensor, group=self.group, group_src=0)
        return tensor

    def all_true(self, flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=flag_device(self.group))
        dist().all_reduce(value, op=dist().ReduceOp.MIN, group=self.group)
        return bool(value.item())

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` (of the shard group), on every rank."""
        box = torch.tensor([value], dtype=torch.int64, device=flag_device(self.group))
        dist().broadcast(box, group=self.group, group_src=0)
        return int(box.item())

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
        dist().reduce_scatter(out, parts, group=self.group)
        a, b = self.bounds(n)
        return out[
            :, : b - a
        ].contiguous()  # base updates may assume dense moments-shaped gradients


def global_matrix_shape(tensor: Any) -> tuple[int, int]:
    shape = tuple(tensor.shape)
    return (shape[0], math.prod(shape[1:]))


def local_matrix(tensor: Any) -> torch.Tensor:
    """This rank's rows as a matrix; a weight's is a view, so updating it updates the weight."""
    local = tensor.to_local()
    if local.dim() == 2:
        return local
    if isinstance(tensor, torch.nn.Parameter):
        return local.view(local.shape[0], -1)
    return local.reshape(local.shape[0], -1)


def basis_shard(rows: Rows, full: torch.Tensor) -> torch.Tensor:
    a, b = rows.bounds(full.shape[0])
    return full[a:b].clone(memory_format=torch.contiguous_format)


