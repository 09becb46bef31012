"""Refuse the engines GaLore cannot run under (DeepSpeed ZeRO, FSDP1), naming what to use instead.

Both flatten parameters into 1-D buffers (FSDP1 ``FlatParameter``, ZeRO
partitions), where no matrix is left to project, and ZeRO also replaces the
optimizer's step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import UnsupportedSetupError

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


