"""Every registered base optimizer's declaration matches the state it really keeps."""

from __future__ import annotations

import pytest
import torch

from hf_galore.declare import StateKey
from hf_galore.errors import GaLoreConfigError
from hf_galore.optim.members import BASE_OPTIMIZERS, follows_gradient, register_base_optimizer, rotation_rules
from hf_galore.optim.validation import TORCH_FLAG_DEFAULTS
from hf_galore.projectors.geometry import effective_rank, projected_shape, sides_for
from tests.helpers import split_groups, tiny_mlp

HYPERPARAMS = {"adafactor": {"lr": 1e-2, "relative_step": False, "beta1": 0.9}}


def _stepped(name: str, dtype: torch.dtype, dims=(32, 48, 24, 8)):
    """Two steps on seeded random gradients of the weights' dtype."""
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    model = tiny_mlp(0, dims).to(dtype)
    optimizer = BASE_OPTIMIZERS[name](split_groups(model, rank=4), **HYPERPARAMS.get(name, {"lr": 1e-2}))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(BASE_OPTIMIZERS))
def test_state_layout_is_the_state_held(name, dtype):
    """Keys, shapes and dtypes declared by ``state_layout`` == the tensors after two steps.

    8-bit: low-rank gradients of 4400 values (over bitsandbytes' 4096), tall and wide, take the 8-bit layout.
    """
    optimizer = _stepped(name, dtype, dims=(64, 1100, 8) if name == "adamw8bit" else (32, 48, 24, 8))
    cls = type(optimizer)
    if name == "adamw8bit":
        assert sum("state1" in s for s in optimizer.state.values()) == 2
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if "rank" in group:
                sides = sides_for(group["proj_type"], tuple(p.shape))
                like = projected_shape(tuple(p.shape), effective_rank(group["rank"], tuple(p.shape)), sides)
            else:
                like = tuple(p.shape)
            layout = cls.state_layout(like, group, state, dtype=p.dtype)
            held = {k: v for k, v in state.items() if k in cls.state_keys}
            assert held.keys() == layout.keys()
            for key, entry in layout.items():
                assert (tuple(held[key].shape), held[key].dtype) == (entry.shape, entry.dtype), key
                if key in follows_gradient(cls):
                    assert entry.shape == like, key  # what FSDP2 shards as the gradient


def test_rotation_rules_agree_across_members():
    rules = rotation_rules()
    assert rules["exp_avg"] == "linear" and rules["exp_avg_sq"] == "squared"
    assert rules["state1"] is None and rules["exp_avg_sq_row"] is None


def test_a_member_rotating_a_shared_key_differently_is_refused():
    class Odd(BASE_OPTIMIZERS["adamw"]):
        name = "odd_adamw"
        state_keys = {"exp_avg": StateKey(rotate=None)}  # noqa: RUF012

    with pytest.raises(GaLoreConfigError, match="'odd_adamw' declares state key 'exp_avg' with rotate=None"):
        register_base_optimizer(Odd)
    assert "odd_adamw" not in BASE_OPTIMIZERS


def test_default_hyperparams_are_the_constructor_defaults():
    assert BASE_OPTIMIZERS["adamw"].default_hyperparams() == {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "stochastic_rounding": True,
        "correct_bias": True,
        **TORCH_FLAG_DEFAULTS,
    }
    # bitsandbytes' switches are checked at construction and never become group keys
    assert BASE_OPTIMIZERS["adamw8bit"].default_hyperparams()["min_8bit_size"] == 4096
    assert not {"optim_bits", "is_paged", "no_deprecation_warning"} & set(
        BASE_OPTIMIZERS["adamw8bit"].default_hyperparams()
    )
    assert BASE_OPTIMIZERS["adafactor"].default_hyperparams()["beta1"] is None
