"""Engines that flatten parameters are refused at start, with what to use instead."""

from __future__ import annotations

import types

import pytest
import torch

from hf_galore.distributed import (
    check_supported_engine,
    is_sharded_tensor,
    optimizer_state_bytes,
    synchronize_bases,
)
from hf_galore.errors import UnsupportedSetupError
from tests.helpers import split_groups, tiny_mlp


def _accelerator(kind: str, fsdp_version: int | None = None):
    from accelerate.utils import DistributedType

    plugin = (
        None
        if fsdp_version is None
        else types.SimpleNamespace(fsdp_version=fsdp_version)
    )
    return types.SimpleNamespace(
        distributed_type=DistributedType[kind], fsdp_plugin=plugin
    )


def _training_args(**kwargs):
    defaults = {"deepspeed": None, "fsdp": [], "fsdp_config": {}}
    return types.SimpleNamespace(**{**defaults, **kwargs})


class FullyShardedDataParallel(
    torch.nn.Module
):  # stands in for FSDP1's wrapper (matched by name)
    pass


class DeepSpeedEngine(torch.nn.Module):
    pass


REFUSED = [
    ("accelerate deepspeed", lambda: _accelerator("DEEPSPEED"), "DeepSpeed"),
    ("accelerate fsdp1", lambda: _accelerator("FSDP", fsdp_version=1), "FSDP1"),
    ("args deepspeed", lambda: _training_args(deepspeed="ds_config.json"), "DeepSpeed"),
    (
        "args fsdp1",
        lambda: _training_args(fsdp=["full_shard"], fsdp_config={"version": 1}),
        "FSDP1",
    ),
    ("fsdp1 module", lambda: torch.nn.Sequential(FullyShardedDataParallel()), "FSDP1"),
    ("deepspeed engine", lambda: DeepSpeedEngine(), "DeepSpeed"),
    (
        "flat param",
        lambda: [types.SimpleNamespace(_is_flat_param=True)],
        "FlatParameter",
    ),
    ("zero-3 param", lambda: [{"params": [types.SimpleNamespace(ds_id=3)]}], "ZeRO-3"),
]

ACCEPTED = [
    ("accelerate ddp", lambda: _accelerator("MULTI_GPU")),
    ("accelerate cpu", lambda: _accelerator("MULTI_CPU")),
    ("accelerate fsdp2", lambda: _accelerator("FSDP", fsdp_version=2)),
    ("args plain", lambda: _training_args()),
    (
        "args fsdp2",
        lambda: _training_args(fsdp=["full_shard"], fsdp_config={"version": 2}),
    ),
    ("plain model", lambda: tiny_mlp()),
    ("something else", lambda: 3),
]


@pytest.mark.parametrize("name,make,engine", REFUSED, ids=[c[0] for c in REFUSED])
def test_flattening_engines_are_refused_with_the_alternative(name, make, engine):
    with pytest.raises(UnsupportedSetupError) as info:
        check_supported_engine(make())
    message = str(info.value)
    assert engine in message
    assert (
        "fully_shard" in message and "fsdp_version: 2" in message
    )  # what to use instead


@pytest.mark.parametrize("name,make", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_supported_setups_pass(name, make):
    assert check_supported_engine(make()) is None


def test_synchronize_bases_is_a_no_op_without_a_process_group():
    import hf_galore

    opt = hf_galore.GaLoreAdamW(split_groups(tiny_mlp(), rank=4))
    assert synchronize_bases(opt) is opt
    assert opt.basis_sync is None


def test_state_bytes_split():
    import hf_galore

    model = tiny_mlp()  # weights 48x32 (right basis), 24x48 and 8x24 (left)
    opt = hf_galore.GaLoreAdamW(split_groups(model, rank=4))
    model(torch.randn(2, 32)).sum().backward()
    opt.step()
    got = optimizer_state_bytes(opt)
    assert got["bases"] == 4 * 4 * (32 + 24 + 8)
    assert got["lowrank_moments"] == 2 * 4 * 4 * (48 + 48 + 24)
    assert got["full_rank"] == 2 * 4 * (48 + 24 + 8)
    assert got["total"] == got["bases"] + got["lowrank_moments"] + got["full_rank"]
    assert not is_sharded_tensor(model[0].weight)
