"""LayerwiseOptimizer: per-weight updates in gradient hooks, checked against the regular optimizer.

The regular optimizer is the oracle: layer-wise mode must give the same
parameters, the same counters and the same checkpoints, only with
gradients freed as soon as each weight is updated.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import math
import pickle

import pytest
import torch
from torch import nn

from hf_galore import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreConfigError,
    UnsupportedSetupError,
)
from hf_galore.optim import layerwise as layerwise_module
from hf_galore.optim.layerwise import LayerwiseOptimizer, as_layerwise
from tests.helpers import max_param_diff, regression_batch, split_groups, tiny_mlp

LOWRANK = {"rank": 4, "update_proj_gap": 3, "scale": 0.25}

# (optimizer class, its hyper-parameters, low-rank keys): every member, both proj sides, weight decay.
MEMBERS = [
    (GaLoreAdamW, {"lr": 1e-2, "weight_decay": 0.1}, LOWRANK),
    (GaLoreAdamW, {"lr": 1e-2}, {**LOWRANK, "proj_type": "reverse_std"}),
    (GaLoreAdamW8bit, {"lr": 1e-2, "weight_decay": 0.05}, LOWRANK),
    (
        GaLoreAdafactor,
        {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9},
        LOWRANK,
    ),
    (
        GaLoreAdafactor,
        {},
        LOWRANK,
    ),  # relative step: lr depends on the per-weight step counter
]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean() * 100.0  # gradients large against eps


def _pair(cls=GaLoreAdamW, hp=None, keys=LOWRANK, seed=0, **layerwise_kwargs):
    """A model + regular optimizer and an identical model + layer-wise optimizer."""
    hp = {"lr": 1e-2} if hp is None else hp
    regular_model = tiny_mlp(seed)
    layerwise_model = copy.deepcopy(regular_model)
    regular = cls(split_groups(regular_model, **keys), **hp)
    layerwise = LayerwiseOptimizer(cls(split_groups(layerwise_model, **keys), **hp), **layerwise_kwargs)
    return regular_model, regular, layerwise_model, layerwise


def _run(model, optimizer, steps, scheduler=None, seed=1):
    x, y = regression_batch(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("cls,hp,keys", MEMBERS)
def test_same_parameters_as_regular_mode(cls, hp, keys):
    regular_model, regular, layerwise_model, layerwise = _pair(cls, hp, keys)
    _run(regular_model, regular, 7)
    _run(layerwise_model, layerwise, 7)
    assert max_param_diff(regular_model, layerwise_model) <= 1e-6
    assert max_param_diff(regular_model, tiny_mlp(0)) > 1e-3  # it trained
    assert regular.galore_stats.refreshes == layerwise.galore_stats.refreshes == 3 * math.ceil(7 / 3)


def test_gradients_are_freed_inside_backward_and_shared_objects():
    _, _, model, optimizer = _pair()
    x, y = regression_batch()
    _loss(model, x, y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.param_groups is optimizer.optimizer.param_groups
    assert optimizer.state is optimizer.optimizer.state
    assert all(float(optimizer.state[p]["step"]) == 1.0 for p in model.parameters())
    optimizer.step()
    assert optimizer.last_grad_norm is not None and float(optimizer.last_grad_norm) > 0


def test_step_hooks_run_once_per_step():
    _, _, model, optimizer = _pair()
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    _run(model, optimizer, 2)
    assert calls == ["pre", "post", "pre", "post"]


def _deep_mlp(layers: int = 12, width: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    blocks: list[nn.Module] = [nn.Linear(32, width), nn.Tanh()]
    for _ in range(layers - 2):
        blocks += [nn.Linear(width, width), nn.Tanh()]
    blocks.append(nn.Linear(width, 8))
    return nn.Sequential(*blocks)


def test_one_tick_per_optimizer_step_whatever_the_number_of_layers():
    """Regression for the per-layer reference path, whose counters and schedules advanced once per layer."""
    model = _deep_mlp(layers=12)
    inner = GaLoreAdamW(split_groups(model, rank=2, update_proj_gap=4), lr=1e-2)
    optimizer = LayerwiseOptimizer(inner)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    calls: list[int] = []
    original = inner.update_params
    inner.update_params = lambda group, params, grads: (
        calls.append(len(params)),
        original(group, params, grads),
    )
    lrs_seen: list[float] = []
    x, y = regression_batch()
    steps = 9
    for _ in range(steps):
        optimizer.zero_grad()
        lrs_seen.append(optimizer.param_groups[1]["lr"])
        _loss(model, x, y).backward()
        optimizer.step()
        scheduler.step()
    n_params = sum(1 for _ in model.parameters())
    assert n_params == 24
    assert len(calls) == steps * n_params and set(calls) == {1}
    assert {float(s["step"]) for s in optimizer.state.values()} == {float(steps)}
    assert scheduler.last_epoch == steps
    assert lrs_seen == pytest.approx([1e-2 / (1 + k) for k in range(steps)])
    assert inner.galore_stats.refreshes == 12 * math.ceil(steps / 4)


def test_scheduler_on_wrapper_drives_every_update():
    regular_model, regular, layerwise_model, layerwise = _pair()
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3) for opt in (regular, layerwise)]
    _run(regular_model, regular, 6, schedulers[0])
    _run(layerwise_model, layerwise, 6, schedulers[1])
    assert layerwise.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.3**3)
    assert max_param_diff(regular_model, layerwise_model) <= 1e-6


def _save_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls,hp", [(GaLoreAdamW, {"lr": 1e-2}), (GaLoreAdamW8bit, {"lr": 1e-2})])
def test_resume_is_bit_exact(cls, hp):
    _, _, model, optimizer = _pair(cls, hp)
    _run(model, optimizer, 4)
    resumed_model = copy.deepcopy(model)
    resumed = LayerwiseOptimizer(cls(split_groups(resumed_model, **LOWRANK), **hp))
    resumed.load_state_dict(_save_load(optimizer.state_dict()))
    _run(model, optimizer, 4)
    _run(resumed_model, resumed, 4)
    assert max_param_diff(model, resumed_model) == 0.0
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            optimizer.state_dict()["state"][3].values(),
            resumed.state_dict()["state"][3].values(),
        )
    )


def test_regular_checkpoint_resumes_layerwise_and_back():
    regular_model, regular, layerwise_model, layerwise = _pair()
    _run(regular_model, regular, 3)
    layerwise_model.load_state_dict(regular_model.state_dict())
    layerwise.load_state_dict(_save_load(regular.state_dict()))
    _run(regular_model, regular, 3)
    _run(layerwise_model, layerwise, 3)
    assert max_param_diff(regular_model, layerwise_model) <= 1e-6
    back = GaLoreAdamW(split_groups(copy.deepcopy(layerwise_model), **LOWRANK), lr=1e-2)
    back.load_state_dict(_save_load(layerwise.state_dict()))
    assert float(back.state_dict()["state"][1]["step"]) == 6.0


# How each accumulation API marks the non-final backward passes of a 3-micro-batch window.
ACCUMULATION_APIS = ["context", "steps", "sync"]


@pytest.mark.parametrize("accumulate", ["auto", "full"])
@pytest.mark.parametrize("api", ACCUMULATION_APIS)
def test_gradient_accumulation_equals_regular(api, accumulate):
    micro = 3
    flags = {"final": True}
    kwargs = {
        "steps": {"accumulation_steps": micro},
        "sync": {"sync": lambda: flags["final"]},
    }.get(api, {})
    keys = {**LOWRANK, "accumulate": accumulate}
    regular_model, regular, layerwise_model, layerwise = _pair(keys=keys, **kwargs)
    x, y = regression_batch(n=48)
    chunks = list(zip(x.chunk(micro), y.chunk(micro)))
    for step in range(4):
        for model, optimizer in (
            (regular_model, regular),
            (layerwise_model, layerwise),
        ):
            optimizer.zero_grad()
            for i, (xb, yb) in enumerate(chunks):
                last = i == micro - 1
                flags["final"] = last
                hold = api == "context" and optimizer is layerwise and not last
                with layerwise.accumulating() if hold else contextlib.nullcontext():
                    (_loss(model, xb, yb) / micro).backward()
                if optimizer is layerwise and not last:
                    # in the subspace: projected weights between refreshes (steps 1 and 2 of gap 3) hold no gradient
                    in_subspace = accumulate == "auto" and step % LOWRANK["update_proj_gap"] != 0
                    assert all((p.grad is None) == (in_subspace and p.dim() == 2) for p in model.parameters())
            optimizer.step()
    assert max_param_diff(regular_model, layerwise_model) <= 1e-6
    assert {float(s["step"]) for s in layerwise.state.values()} == {4.0}


def test_short_final_window_is_applied_by_step():
    regular_model, regular, layerwise_model, layerwise = _pair(accumulation_steps=3)
    x, y = regression_batch(n=32)
    for model, optimizer in ((regular_model, regular), (layerwise_model, layerwise)):
        optimizer.zero_grad()
        for xb, yb in zip(x.chunk(2), y.chunk(2)):  # two micro-batches in a window of three
            (_loss(model, xb, yb) / 2).backward()
        optimizer.step()
    assert all(p.grad is None for p in layerwise_model.parameters())
    assert max_param_diff(regular_model, layerwise_model) <= 1e-6


def test_zero_grad_restarts_the_accumulation_window():
    _, _, model, optimizer = _pair(accumulation_steps=2)
    x, y = regression_batch()
    _loss(model, x, y).backward()
    optimizer.zero_grad()  # discards the first micro-batch
    _loss(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())  # one of two seen: not yet updated
    assert all(len(optimizer.state[p]) == 0 for p in model.parameters())


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_per_parameter_clipping_and_grad_norm(max_norm):
    regular_model, regular, layerwise_model, layerwise = _pair(per_param_max_norm=max_norm)
    x, y = regression_batch()
    for _ in range(3):
        regular.zero_grad()
        _loss(regular_model, x, y).backward()
        total = torch.nn.utils.get_total_norm([p.grad for p in regular_model.parameters()])
        for p in regular_model.parameters():
            torch.nn.utils.clip_grad_norm_([p], max_norm)
        regular.step()
        layerwise.zero_grad()
        _loss(layerwise_model, x, y).backward()
        assert float(layerwise.current_grad_norm()) == pytest.approx(float(total), rel=1e-5)
        layerwise.step()
        assert float(layerwise.last_grad_norm) == pytest.approx(float(total), rel=1e-5)
    assert max_param_diff(regular_model, layerwise_model) <= 1e-6


def test_without_hooks_step_updates_everything_like_regular_mode():
    regular_model, regular, layerwise_model, layerwise = _pair(register_hooks=False)
    x, y = regression_batch()
    _loss(layerwise_model, x, y).backward()
    assert all(p.grad is not None for p in layerwise_model.parameters())
    layerwise.zero_grad()
    _run(regular_model, regular, 3)
    _run(layerwise_model, layerwise, 3)
    assert max_param_diff(regular_model, layerwise_model) <= 1e-6


def test_update_param_is_the_engine_seam():
    """An engine that reduces gradients first builds with register_hooks=False and calls update_param."""
    regular_model, regular, layerwise_model, layerwise = _pair(register_hooks=False)
    x, y = regression_batch()
    _run(regular_model, regular, 2)
    for _ in range(2):
        _loss(layerwise_model, x, y).backward()
        for p in reversed(list(layerwise_model.parameters())):
            layerwise.update_param(p)
            assert p.grad is None
        layerwise.step()
    assert max_param_diff(regular_model, layerwise_model) <= 1e-6


def test_a_newer_optimizer_takes_over_the_hooks():
    regular_model, regular, model, old = _pair()
    with pytest.warns(UserWarning, match="newest one now updates them"):
        new = LayerwiseOptimizer(GaLoreAdamW(split_groups(model, **LOWRANK), lr=1e-2))
    _run(regular_model, regular, 3)
    _run(model, new, 3)
    assert max_param_diff(regular_model, model) <= 1e-6  # updated once per step, by the new one
    assert len(old.state) == 0
    new.remove_hooks()
    x, y = regression_batch()
    _loss(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())  # nobody hooks them any more


def test_a_regular_optimizer_taking_the_parameters_silences_the_old_hooks():
    """A model reused after layer-wise training trains exactly like a fresh copy of it."""
    _, _, model, old = _pair()
    _run(model, old, 2)
    fresh = copy.deepcopy(model)  # same weights, no hooks (deepcopy drops them)
    reused_opt = GaLoreAdamW(split_groups(model, **LOWRANK), lr=1e-2)  # `old` still alive, hooks attached
    fresh_opt = GaLoreAdamW(split_groups(fresh, **LOWRANK), lr=1e-2)
    _run(model, reused_opt, 3)
    _run(fresh, fresh_opt, 3)
    assert max_param_diff(model, fresh) == 0.0
    assert sum(len(s) for s in old.state.values()) > 0 and all(int(s["step"]) == 2 for s in old.state.values())


def test_a_dropped_optimizer_cannot_act_on_the_model():
    _, _, model, layerwise = _pair()
    _run(model, layerwise, 1)
    hooks = [p._post_accumulate_grad_hooks for p in model.parameters()]
    assert all(h for h in hooks)
    del layerwise
    gc.collect()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())  # removed with it
    x, y = regression_batch()
    _loss(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())  # nobody consumed the gradients


def test_the_owner_registry_leaves_the_model_picklable():
    """Ownership lives in a weak registry, not on the parameters: torch.save(model) still works."""
    _, _, model, layerwise = _pair()
    _run(model, layerwise, 1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert max_param_diff(model, loaded) == 0.0


def test_remove_and_register_hooks_again():
    regular_model, regular, model, layerwise = _pair()
    _run(regular_model, regular, 4)
    _run(model, layerwise, 2)
    layerwise.remove_hooks()
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    layerwise.register_hooks()
    layerwise.register_hooks()  # no-op while attached
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
    x, y = regression_batch()
    _loss(model, x, y).backward()
    assert all(p.grad is None for p in model.parameters())  # updated in the hooks
    layerwise.step()
    _run(model, layerwise, 1)
    assert max_param_diff(regular_model, model) <= 1e-6


def test_zero_grad_after_a_backward_that_raised_rearms_every_weight():
    _, _, model, layerwise = _pair()
    x, y = regression_batch()
    hidden = {}

    def fail(grad):
        raise RuntimeError("boom in the middle of backward")

    h = model[0].register_forward_hook(lambda m, i, out: hidden.update(handle=out.register_hook(fail)))
    with pytest.raises(RuntimeError, match="boom"):
        _loss(model, x, y).backward()  # the last layer's weights were updated before the error
    assert layerwise._updated
    h.remove()
    layerwise.zero_grad()
    _loss(model, x, y).backward()  # was: "received a second final gradient"
    layerwise.step()
    assert layerwise.last_grad_norm is not None and torch.isfinite(layerwise.last_grad_norm)
    assert all(p.grad is None for p in model.parameters())


def test_as_layerwise_unwraps():
    _, regular, _, layerwise = _pair()

    class Wrapper:  # accelerate's AcceleratedOptimizer keeps the real one in `.optimizer`
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert as_layerwise(Wrapper(Wrapper(layerwise))) is layerwise
    assert as_layerwise(regular) is None


BAD_ARGUMENTS = [
    ({"per_param_max_norm": 0.0}, GaLoreConfigError, "`per_param_max_norm`"),
    ({"accumulation_steps": 0}, GaLoreConfigError, "`accumulation_steps`"),
    ({"sync": "always"}, GaLoreConfigError, "`sync`"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_ARGUMENTS)
def test_bad_arguments(kwargs, error, message):
    model = tiny_mlp()
    with pytest.raises(error, match=message):
        LayerwiseOptimizer(GaLoreAdamW(model.parameters()), **kwargs)


def test_refuses_a_non_galore_optimizer():
    with pytest.raises(GaLoreConfigError, match="GaLoreOptimizer.*'AdamW'"):
        LayerwiseOptimizer(torch.optim.AdamW(tiny_mlp().parameters()))


def test_second_update_without_step_is_refused():
    _, _, model, _ = _pair()
    x, y = regression_batch()
    _loss(model, x, y).backward()
    with pytest.raises(UnsupportedSetupError, match="accumulating"):
        _loss(model, x, y).backward()


def test_refuses_ddp_before_the_reduction(monkeypatch):
    monkeypatch.setattr(layerwise_module, "_world_size", lambda: 2)
    with pytest.raises(UnsupportedSetupError, match="2 processes.*optim='galore_adamw'"):
        _pair()
    monkeypatch.undo()
    _, _, model, _ = _pair()
    monkeypatch.setattr(layerwise_module, "_world_size", lambda: 2)  # DDP set up after the optimizer
    x, y = regression_batch()
    with pytest.raises(UnsupportedSetupError, match="all-reduces"):
        _loss(model, x, y).backward()
    _, _, _, layerwise = _pair(register_hooks=False)  # an engine calling update_param itself is allowed
    assert not layerwise.hooks_registered


# ------------------------------------------------------------ issue 26
@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))], ids=["deepcopy", "pickle"])
def test_copies_and_pickles_of_a_layerwise_optimizer_round_trip(clone):
    """Issue 26: `copy.deepcopy` / `pickle` of a LayerwiseOptimizer raised AttributeError."""
    model = tiny_mlp(seed=6)
    opt = LayerwiseOptimizer(GaLoreAdamW(split_groups(model, rank=4), lr=1e-2), per_param_max_norm=1.0)
    x, y = regression_batch(d_in=32, d_out=8)
    (model(x) - y).square().mean().backward()
    opt.step()
    copied = clone(opt)
    assert copied.per_param_max_norm == 1.0 and copied.hooks_registered
    assert copied.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    # the copy drives its own (copied) parameters from their hooks; the original model is untouched by it
    params = [p for g in copied.param_groups for p in g["params"]]
    assert not any(p is q for p in params for q in model.parameters())
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
        copied._hook(p)
    copied.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(p.grad is None for p in params)


def test_grad_scaler_on_a_layerwise_optimizer_is_refused_by_name():
    """Issue 26: `GradScaler.step(layerwise_optimizer)` asserted "No inf checks were recorded"."""
    model = tiny_mlp(seed=7)
    opt = LayerwiseOptimizer(GaLoreAdamW(split_groups(model, rank=4), lr=1e-2))
    scaler = torch.amp.GradScaler("cpu")
    x, y = regression_batch(d_in=32, d_out=8)
    scaler.scale((model(x) - y).square().mean()).backward()
    with pytest.raises(UnsupportedSetupError, match="GradScaler cannot drive layer-wise mode.*Train in bf16"):
        scaler.step(opt)
