"""GaLore on PyTorch's own distributed engines: DDP, layer-wise under DDP, FSDP2.

One module per job (docs/distributed.md walks through each):

* ``guards`` — :func:`check_supported_engine` refuses engines that flatten
  parameters (FSDP1 ``FlatParameter``, DeepSpeed ZeRO), which hide the matrix
  shape GaLore projects, and names what to use instead.
* ``ddp`` — the basis broadcast that keeps data-parallel ranks on one basis
  (switched on by the optimizer itself, :func:`synchronize_bases` to set it
  explicitly) and :func:`register_layerwise_ddp_hook` for layer-wise updates
  on reduced gradients.
* ``fsdp2`` — the FSDP2 engine: the distributed primitives (gather a
  gradient to the rank that computes the basis, broadcast, keep a basis's
  rows) on which ``optim/lowrank.py`` runs its one algorithm for ``DTensor``
  row shards.
* ``checkpoint`` — ``state_dict`` hooks that show the low-rank shards to
  ``torch.distributed.checkpoint`` as ``DTensor`` s.

Importing this package registers the DDP and FSDP2 engines with
``hf_galore.optim.engines`` (``import hf_galore`` does it).
"""

from __future__ import annotations

from .checkpoint import sharded_load_state_dict_pre_hook, sharded_state_dict_post_hook
from .ddp import DDP_ENGINE, BroadcastBasisSync, DDPEngine, register_layerwise_ddp_hook, synchronize_bases
from .fsdp2 import (
    FSDP2_ENGINE,
    FSDP2Engine,
    ShardedPlacement,
    apply_sharded_update,
    is_sharded_tensor,
    optimizer_state_bytes,
    project_sharded_gradient,
)
from .guards import check_supported_engine

__all__ = [
    "DDP_ENGINE",
    "FSDP2_ENGINE",
    "BroadcastBasisSync",
    "DDPEngine",
    "FSDP2Engine",
    "ShardedPlacement",
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
