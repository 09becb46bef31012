"""Stochastic rounding of updates into bf16 / fp16 weights, through every optimizer and layer-wise mode.

The float32 run is the oracle: a bf16 weight updated with stochastic
rounding must move (on average) as far along the float32 weight's path as
the float32 weight itself; rounded to nearest it barely moves at
fine-tuning learning rates (issue table: 0.015 at lr 1e-5, 0.146 at 1e-4).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from hf_galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreConfig, GaLoreConfigError
from hf_galore.optim.layerwise import LayerwiseOptimizer
from hf_galore.quant.rounding import add_rounded_
from hf_galore.targets import galore_param_groups
from tests.helpers import tiny_mlp

MEMBERS = {
    "adamw": (GaLoreAdamW, {}),
    "adamw8bit": (GaLoreAdamW8bit, {}),
    "adafactor": (GaLoreAdafactor, {"relative_step": False, "scale_parameter": False}),
}
SIZE, RANK, STEPS = 256, 32, 20  # the 1024 x 1024 / rank 128, scaled down 4x


def _build(cls, groups, layerwise, **kwargs):
    if layerwise:
        return LayerwiseOptimizer(groups, optimizer_class=cls, **kwargs)
    return cls(groups, **kwargs)


def _along_path(
    member: str,
    lr: float,
    *,
    lowrank: bool,
    layerwise: bool,
    seed: int,
    sr: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> float:
    """Displacement of a bf16 (or fp16) weight projected on the float32 weight's, as a fraction of it."""
    cls, kwargs = MEMBERS[member]
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(SIZE, SIZE, generator=gen) * 0.02
    grads = [torch.randn(SIZE, SIZE, generator=gen) for _ in range(3)]
    moved = {}
    for run_dtype in (torch.float32, dtype):
        start = w0.to(run_dtype)
        weight = torch.nn.Parameter(start.clone())
        group = {"params": [weight], "stochastic_rounding": sr}
        if lowrank:
            group.update(rank=RANK, scale=0.25, update_proj_gap=200)
        optimizer = _build(cls, [group], layerwise, lr=lr, **kwargs)
        for step in range(STEPS):
            weight.grad = grads[step % 3].to(run_dtype)
            optimizer.step()
        moved[run_dtype] = weight.detach().double() - start.double()
    reference = moved[torch.float32]
    return float((moved[dtype] * reference).sum() / reference.square().sum())


@pytest.mark.parametrize("layerwise", [False, True], ids=["regular", "layerwise"])
@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_bf16_weights_follow_the_float32_path_at_fine_tuning_learning_rates(member, layerwise):
    for lr in (1e-5, 1e-4):
        ratios = [_along_path(member, lr, lowrank=True, layerwise=layerwise, seed=seed) for seed in (0, 1)]
        assert sum(ratios) / len(ratios) >= 0.9, (lr, ratios)
    # rounded to nearest, the same weight keeps only a fraction of its updates (the table)
    off = _along_path(member, 1e-5, lowrank=True, layerwise=layerwise, seed=0, sr=False)
    assert off < 0.1


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_full_rank_bf16_weights_follow_the_float32_path(member):
    ratio = _along_path(member, 1e-5, lowrank=False, layerwise=False, seed=0)
    off = _along_path(member, 1e-5, lowrank=False, layerwise=False, seed=0, sr=False)
    assert ratio >= 0.9 and off < 0.5, (ratio, off)  # Adafactor's clipped steps keep the most: 0.28


@pytest.mark.parametrize("lowrank", [True, False], ids=["lowrank", "full_rank"])
def test_fp16_weights_follow_the_float32_path(lowrank):
    """fp16 keeps 3 more bits than bf16: full-rank Adam steps of lr survive to nearest (0.88), scaled ones do not."""
    ratio = _along_path("adamw", 1e-5, lowrank=lowrank, layerwise=False, seed=0, dtype=torch.float16)
    assert ratio >= 0.9
    if lowrank:
        assert _along_path("adamw", 1e-5, lowrank=True, layerwise=False, seed=0, sr=False, dtype=torch.float16) < 0.5


def test_full_rank_8bit_rounding_in_blocks_equals_one_kernel_call():
    """bitsandbytes' kernel runs per rounding block; the result equals one whole-tensor call, rounded."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(600, 1000, generator=gen) * 0.02).bfloat16())  # 3 blocks
    optimizer = GaLoreAdamW8bit([weight], lr=1e-3, weight_decay=0.1)
    group = optimizer.param_groups[0]
    for step in range(3):
        weight.grad = torch.randn(weight.shape, generator=gen).bfloat16()
        before = weight.detach().clone()
        saved = {k: v.clone() for k, v in optimizer.state[weight].items()}
        optimizer.step()
        state = optimizer.state[weight]
        if step == 0:
            continue  # the first step creates the state
        saved["step"] += 1
        buffer = torch.zeros_like(before)
        optimizer._bnb_step_(buffer, weight.grad, saved, group, lr=1e-3, wd=0.0)
        expected = before.clone()
        key = optimizer._rounding_key(weight, group, saved)
        add_rounded_(expected, buffer, alpha=1.0, decay=1.0 - 1e-3 * 0.1, key=key)
        assert torch.equal(weight.detach(), expected)
        assert all(torch.equal(saved[k], state[k]) for k in ("state1", "state2", "absmax1", "absmax2"))


def _model_and_steps(dtype, seed=0):
    model = tiny_mlp(seed=seed).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in model.parameters()] for _ in range(6)]
    return model, grads


def _groups(model, **extra):
    params = list(model.parameters())
    matrices = [p for p in params if p.dim() == 2]
    others = [p for p in params if p.dim() != 2]
    return [
        {"params": matrices, "rank": 2, "update_proj_gap": 3, **extra},
        {"params": others, **extra},
    ]


def _run(optimizer, model, grads):
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_float32_weights_are_untouched_by_the_option(member):
    cls, kwargs = MEMBERS[member]
    finals = []
    for sr in (True, False):
        model, grads = _model_and_steps(torch.float32)
        optimizer = cls(_groups(model, stochastic_rounding=sr), lr=1e-3, weight_decay=0.1, **kwargs)
        _run(optimizer, model, grads)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_off_rounds_to_nearest_and_on_does_not(member):
    """Without the option every bf16 write is round-to-nearest (before the option existed, the only way)."""
    cls, kwargs = MEMBERS[member]
    results = {}
    for sr in (True, False):
        model, grads = _model_and_steps(torch.bfloat16)
        optimizer = cls(_groups(model), lr=1e-3, weight_decay=0.1, stochastic_rounding=sr, **kwargs)
        _run(optimizer, model, grads)
        results[sr] = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(results[True], results[False]))


def test_off_full_rank_adamw_equals_torch_fused_adamw_in_bf16():
    model, grads = _model_and_steps(torch.bfloat16)
    reference = copy.deepcopy(model)
    ours = GaLoreAdamW(model.parameters(), lr=1e-3, weight_decay=0.1, stochastic_rounding=False)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    _run(ours, model, grads)
    _run(theirs, reference, grads)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_sr_seed_selects_the_noise_and_reproduces():
    finals = []
    for seed in (0, 0, 5):
        model, grads = _model_and_steps(torch.bfloat16)
        optimizer = GaLoreAdamW(_groups(model, sr_seed=seed), lr=1e-3)
        _run(optimizer, model, grads)
        finals.append(torch.cat([p.detach().float().flatten() for p in model.parameters()]))
    assert torch.equal(finals[0], finals[1]) and not torch.equal(finals[0], finals[2])


@pytest.mark.parametrize("layerwise", [False, True], ids=["regular", "layerwise"])
@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_resume_is_bit_exact_with_bf16_weights(member, layerwise):
    cls, kwargs = MEMBERS[member]
    model, grads = _model_and_steps(torch.bfloat16)
    uninterrupted = _build(cls, _groups(model), layerwise, lr=1e-3, weight_decay=0.1, **kwargs)
    _run(uninterrupted, model, grads)
    expected = [p.detach().clone() for p in model.parameters()]

    model, grads = _model_and_steps(torch.bfloat16)
    first = _build(cls, _groups(model), layerwise, lr=1e-3, weight_decay=0.1, **kwargs)
    _run(first, model, grads[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    if layerwise:
        first.remove_hooks()
    resumed_model, _ = _model_and_steps(torch.bfloat16, seed=7)  # different weights, overwritten by the load
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = _build(cls, _groups(resumed_model), layerwise, lr=1e-3, weight_decay=0.1, **kwargs)
    resumed.load_state_dict(checkpoint["optimizer"])
    _run(resumed, resumed_model, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed_model.parameters()))


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_layerwise_rounds_exactly_as_the_regular_optimizer(member):
    """Same parameter positions, same step counters: the same noise, so the same bf16 weights."""
    cls, kwargs = MEMBERS[member]
    finals = []
    for layerwise in (False, True):
        model, grads = _model_and_steps(torch.bfloat16)
        optimizer = _build(cls, _groups(model), layerwise, lr=1e-3, weight_decay=0.1, **kwargs)
        _run(optimizer, model, grads)
        finals.append([p.detach().clone() for p in model.parameters()])
        if layerwise:
            optimizer.remove_hooks()
    assert all(torch.equal(a, b) for a, b in zip(*finals))


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_rounding_adds_no_state(member):
    """The noise is keyed by the existing `step` counter: the state holds the same tensors either way."""
    cls, kwargs = MEMBERS[member]
    layouts = []
    for sr in (True, False):
        model, grads = _model_and_steps(torch.bfloat16)
        optimizer = cls(_groups(model, stochastic_rounding=sr), lr=1e-3, **kwargs)
        _run(optimizer, model, grads[:2])
        layouts.append(
            [{k: (tuple(v.shape), v.dtype) for k, v in optimizer.state[p].items()} for p in model.parameters()]
        )
    assert layouts[0] == layouts[1]


def test_checkpoints_from_before_the_option_load():
    """A saved group without the keys takes the value this optimizer was built with (as for other new keys)."""
    model, grads = _model_and_steps(torch.bfloat16)
    optimizer = GaLoreAdamW(_groups(model), lr=1e-3)
    _run(optimizer, model, grads[:1])
    old = copy.deepcopy(optimizer.state_dict())
    for group in old["param_groups"]:
        del group["stochastic_rounding"], group["sr_seed"]
    for built_with in (True, False):
        fresh = GaLoreAdamW(_groups(model), lr=1e-3, stochastic_rounding=built_with)
        fresh.load_state_dict(old)
        assert all(g["stochastic_rounding"] is built_with and g["sr_seed"] == 0 for g in fresh.param_groups)
        _run(fresh, model, grads[1:2])


@pytest.mark.parametrize("bad", [{"stochastic_rounding": "yes"}, {"stochastic_rounding": 1}, {"sr_seed": -1}])
def test_bad_group_values_are_refused(bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(GaLoreConfigError, match=f"`{key}`.*{value!r}"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], **bad}])


def test_config_field_and_optim_args_reach_every_group():
    model = tiny_mlp()
    config = GaLoreConfig.from_optim_args("rank=2, stochastic_rounding=false, sr_seed=3", target_modules=["0"])
    assert config.stochastic_rounding is False and config.options == {"sr_seed": 3}
    groups = galore_param_groups(model, config)
    assert {"rank" in g for g in groups} == {True, False}
    assert all(g["stochastic_rounding"] is False and g["sr_seed"] == 3 for g in groups)
    assert GaLoreConfig.from_dict(config.to_dict()) == config
    assert GaLoreConfig().stochastic_rounding is True
    with pytest.raises(GaLoreConfigError, match="stochastic_rounding"):
        GaLoreConfig(stochastic_rounding="no")
