"""Gradient accumulation in the subspace (hf_galore.optim.accumulation), against independent computations.

The oracles: the regular optimizer with autograd's full accumulation, one
big batch, and the norms computed from the full micro-batch gradients kept
aside.
"""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch

from hf_galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreConfigError, UnsupportedSetupError
from hf_galore.optim.accumulation import accumulates_in_subspace
from hf_galore.optim.layerwise import LayerwiseOptimizer
from tests.helpers import max_param_diff, regression_batch, split_groups, tiny_mlp

LOWRANK = {"rank": 4, "update_proj_gap": 3, "scale": 0.25}
MEMBERS = [
    (GaLoreAdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (GaLoreAdamW8bit, {"lr": 1e-2, "weight_decay": 0.05}),
    (GaLoreAdafactor, {"lr": 1e-2, "relative_step": False, "scale_parameter": False}),
]
MICRO = 4


def _loss(model, x, y):
    return (model(x) - y).square().mean() * 100.0


def _build(model, cls, hp, layerwise=False, **keys):
    optimizer = cls(split_groups(model, **{**LOWRANK, **keys}), **hp)
    return LayerwiseOptimizer(optimizer) if layerwise else optimizer


def _window(model, optimizer, x, y, micro=MICRO):
    """One optimizer step over ``micro`` micro-batches (layer-wise: the non-final ones marked)."""
    optimizer.zero_grad()
    for i, (xb, yb) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
        hold = isinstance(optimizer, LayerwiseOptimizer) and i < micro - 1
        with optimizer.accumulating() if hold else contextlib.nullcontext():
            (_loss(model, xb, yb) / micro).backward()
    optimizer.step()


def _projected(model):
    return [p for p in model.parameters() if p.dim() >= 2]


@pytest.mark.parametrize("cls,hp", MEMBERS, ids=lambda v: getattr(v, "__name__", ""))
def test_subspace_accumulation_equals_full_accumulation_and_one_big_batch(cls, hp):
    if cls is GaLoreAdamW8bit:
        pytest.importorskip("bitsandbytes")
    x, y = regression_batch(n=64)
    base = tiny_mlp(0)
    models = {how: copy.deepcopy(base) for how in ("big_batch", "full", "layerwise", "lowrank")}
    optimizers = {
        "big_batch": _build(models["big_batch"], cls, hp),
        "full": _build(models["full"], cls, hp),  # the regular optimizer: autograd's full accumulation
        "layerwise": _build(models["layerwise"], cls, hp, layerwise=True),  # in the subspace by default
        "lowrank": _build(models["lowrank"], cls, hp, accumulate="lowrank"),  # the regular optimizer's option
    }
    for _ in range(7):  # refreshes at steps 0, 3 and 6
        optimizers["big_batch"].zero_grad()
        _loss(models["big_batch"], x, y).backward()
        optimizers["big_batch"].step()
        for how in ("full", "layerwise", "lowrank"):
            _window(models[how], optimizers[how], x, y)
    for how in ("full", "layerwise", "lowrank"):
        assert max_param_diff(models["big_batch"], models[how]) <= 2e-5, how
    assert max_param_diff(models["full"], models["layerwise"]) <= 2e-5
    assert max_param_diff(models["full"], models["lowrank"]) <= 2e-5
    assert optimizers["lowrank"].galore_stats.refreshes == optimizers["full"].galore_stats.refreshes == 9


def test_projected_gradients_are_freed_between_micro_batches_except_at_refresh_steps():
    model = tiny_mlp(0)
    optimizer = _build(model, GaLoreAdamW, {"lr": 1e-2}, layerwise=True)
    x, y = regression_batch(n=64)
    held_per_step = []
    for step in range(4):
        optimizer.zero_grad()
        held = 0
        for i, (xb, yb) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO))):
            with optimizer.accumulating() if i < MICRO - 1 else contextlib.nullcontext():
                (_loss(model, xb, yb) / MICRO).backward()
            if i < MICRO - 1:
                held = max(held, sum(p.grad.numel() for p in model.parameters() if p.grad is not None))
                assert all(p.grad is not None for p in model.parameters() if p.dim() == 1)  # full rank: in .grad
        optimizer.step()
        held_per_step.append(held)
    everything = sum(p.numel() for p in model.parameters())
    biases = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert held_per_step == [everything, biases, biases, everything]  # steps 0 and 3 refresh every basis


def test_staggered_refresh_holds_only_the_weights_due():
    model = tiny_mlp(0)
    optimizer = _build(model, GaLoreAdamW, {"lr": 1e-2}, layerwise=True, refresh="staggered")
    x, y = regression_batch(n=64)
    for step in range(7):
        optimizer.zero_grad()
        due = {
            i
            for i, p in enumerate(_projected(model))
            if step == 0 or step % 3 == optimizer.state[p]["refresh_phase"]
        }
        for i, (xb, yb) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO))):
            with optimizer.accumulating() if i < MICRO - 1 else contextlib.nullcontext():
                (_loss(model, xb, yb) / MICRO).backward()
            if i < MICRO - 1:
                assert {i for i, p in enumerate(_projected(model)) if p.grad is not None} == due
        optimizer.step()


def test_online_pca_falls_back_to_full_accumulation_and_says_why():
    model = tiny_mlp(0)
    optimizer = _build(model, GaLoreAdamW, {"lr": 1e-2}, layerwise=True, projector="online_pca")
    reference_model = copy.deepcopy(model)
    reference = _build(reference_model, GaLoreAdamW, {"lr": 1e-2}, projector="online_pca")
    x, y = regression_batch(n=64)
    for _ in range(3):
        _window(reference_model, reference, x, y)
        optimizer.zero_grad()
        for i, (xb, yb) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO))):
            with optimizer.accumulating() if i < MICRO - 1 else contextlib.nullcontext():
                (_loss(model, xb, yb) / MICRO).backward()
            if i < MICRO - 1:  # the basis moves with every step's full gradient: it stays in .grad
                assert all(p.grad is not None for p in model.parameters())
        optimizer.step()
    assert max_param_diff(model, reference_model) <= 1e-6


def _micro_grads(model, x, y):
    """Each micro-batch's full gradient of every parameter (computed aside, for the oracles)."""
    out = []
    for xb, yb in zip(x.chunk(MICRO), y.chunk(MICRO)):
        model.zero_grad()
        (_loss(model, xb, yb) / MICRO).backward()
        out.append({p: p.grad.clone() for p in model.parameters()})
    model.zero_grad()
    return out


def test_norm_bound_is_exact_in_the_subspace_and_bounds_the_full_norm():
    model = tiny_mlp(0)
    optimizer = _build(model, GaLoreAdamW, {"lr": 1e-2})
    x, y = regression_batch(n=64)
    _window(model, optimizer, x, y)  # step 0: the bases
    grads = _micro_grads(model, x, y)
    for p in _projected(model):
        for micro in grads:
            p.grad = micro[p].clone()
            assert optimizer.accumulate_gradient(p) and p.grad is None
        entry = optimizer.pending_gradient(p)
        basis = optimizer.state[p].get("basis_right", optimizer.state[p].get("basis_left"))
        left = "basis_left" in optimizer.state[p]
        total = sum(micro[p] for micro in grads)
        projected = basis.t() @ total if left else total @ basis
        residuals = [g - (basis @ (basis.t() @ g) if left else (g @ basis) @ basis.t()) for g in (m[p] for m in grads)]
        assert torch.allclose(entry.low, projected, atol=1e-5, rtol=1e-5)
        expected = (projected.norm() ** 2 + sum(r.norm() for r in residuals) ** 2).sqrt()
        assert float(entry.norm_bound()) == pytest.approx(float(expected), rel=1e-5)
        assert float(entry.norm_bound()) >= float(total.norm()) * (1 - 1e-6)
        assert float(entry.norm_bound()) <= float(total.norm()) * MICRO**0.5


def test_one_micro_batch_norm_is_exact():
    model = tiny_mlp(0)
    optimizer = _build(model, GaLoreAdamW, {"lr": 1e-2})
    x, y = regression_batch(n=64)
    _window(model, optimizer, x, y)
    _loss(model, x, y).backward()
    full = {p: p.grad.norm() for p in _projected(model)}
    for p in _projected(model):
        optimizer.accumulate_gradient(p)
        assert float(optimizer.pending_gradient(p).norm_bound()) == pytest.approx(float(full[p]), rel=1e-5)


def test_per_parameter_clipping_scales_the_window_by_its_bound():
    """Layer-wise clipping of an accumulated window: the step of the full-accumulation optimizer whose
    gradients are scaled by min(1, c / bound), the bound computed here from the kept micro-batch gradients."""
    max_norm = 0.5
    x, y = regression_batch(n=64)
    model = tiny_mlp(0)
    reference_model = copy.deepcopy(model)
    optimizer = LayerwiseOptimizer(GaLoreAdamW(split_groups(model, **LOWRANK), lr=1e-2), per_param_max_norm=max_norm)
    reference = GaLoreAdamW(split_groups(reference_model, **LOWRANK), lr=1e-2)
    _window(model, optimizer, x, y)  # step 0 (refresh: full accumulation, clipped by the exact norm)
    reference.zero_grad()
    for xb, yb in zip(x.chunk(MICRO), y.chunk(MICRO)):
        (_loss(reference_model, xb, yb) / MICRO).backward()
    for p in reference_model.parameters():
        torch.nn.utils.clip_grad_norm_([p], max_norm)
    reference.step()
    assert max_param_diff(model, reference_model) <= 1e-6

    grads = _micro_grads(reference_model, x, y)
    _window(model, optimizer, x, y)  # step 1: in the subspace, clipped by the bound
    logged = []
    for p in reference_model.parameters():
        total = sum(micro[p] for micro in grads)
        if p.dim() == 1:
            norm = total.norm()
        else:
            state = reference.state[p]
            left = "basis_left" in state
            basis = state["basis_left" if left else "basis_right"]
            low = basis.t() @ total if left else total @ basis
            residual = sum(
                (g - (basis @ (basis.t() @ g) if left else (g @ basis) @ basis.t())).norm() for g in (m[p] for m in grads)
            )
            norm = (low.norm() ** 2 + residual**2).sqrt()
        logged.append(norm)
        p.grad = total * torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    reference.step()
    assert max_param_diff(model, reference_model) <= 1e-5
    expected = torch.stack(logged).square().sum().sqrt()
    assert float(optimizer.last_grad_norm) == pytest.approx(float(expected), rel=1e-5)


def test_regular_clip_grad_norm_includes_the_accumulators():
    x, y = regression_batch(n=64)
    model = tiny_mlp(0)
    optimizer = _build(model, GaLoreAdamW, {"lr": 1e-2}, accumulate="lowrank")
    _window(model, optimizer, x, y)
    optimizer.zero_grad()
    for xb, yb in zip(x.chunk(MICRO), y.chunk(MICRO)):
        (_loss(model, xb, yb) / MICRO).backward()
    assert all(p.grad is None for p in _projected(model))
    bounds = {p: optimizer.pending_gradient(p).norm_bound() for p in _projected(model)}
    biases = {p: p.grad.norm() for p in model.parameters() if p.dim() == 1}
    expected = torch.stack(list(bounds.values()) + list(biases.values())).square().sum().sqrt()
    lows = {p: optimizer.pending_gradient(p).low.clone() for p in _projected(model)}
    total = optimizer.clip_grad_norm_(0.1)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    coef = 0.1 / (float(expected) + 1e-6)
    for p, low in lows.items():
        assert torch.allclose(optimizer.pending_gradient(p).low, low * coef, rtol=1e-5, atol=1e-7)
    after = torch.stack(
        [optimizer.pending_gradient(p).norm_bound() for p in _projected(model)]
        + [p.grad.norm() for p in model.parameters() if p.dim() == 1]
    )
    assert float(after.square().sum().sqrt()) == pytest.approx(0.1, rel=1e-4)


def test_a_nan_in_any_micro_batch_skips_that_weight_only():
    model = tiny_mlp(0)
    optimizer = LayerwiseOptimizer(GaLoreAdamW(split_groups(model, **LOWRANK), lr=1e-2), register_hooks=False)
    for p in model.parameters():  # step 0: bases
        p.grad = torch.ones_like(p) * 1e-2
        optimizer.update_param(p)
    optimizer.step()
    bad, good = _projected(model)[0], _projected(model)[1]
    before = {p: (p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()}) for p in (bad, good)}
    for micro in range(3):
        for p in (bad, good):
            p.grad = torch.randn_like(p)
            if p is bad and micro == 1:
                p.grad[0, 0] = float("nan")
            if micro < 2:
                assert optimizer.optimizer.accumulate_gradient(p)
            else:
                optimizer.update_param(p)
    optimizer.step()
    weight, state = before[bad]
    assert torch.equal(bad, weight)
    assert all(torch.equal(optimizer.state[bad][k], v) for k, v in state.items())
    assert not torch.equal(good, before[good][0])
    assert float(optimizer.state[good]["step"]) == 2.0
    assert optimizer.galore_stats.skipped_steps == 1


def _mid_window():
    """A regular optimizer with ``accumulate="lowrank"`` after one step (bases made) and one backward of the next
    window: every projected weight's gradient is in its accumulator."""
    x, y = regression_batch(n=64)
    model = tiny_mlp(0)
    optimizer = _build(model, GaLoreAdamW, {"lr": 1e-2}, accumulate="lowrank")
    _window(model, optimizer, x, y)
    _loss(model, x, y).backward()
    return model, optimizer, x, y


def test_zero_grad_discards_the_window():
    model, optimizer, _, _ = _mid_window()
    assert all(optimizer.pending_gradient(p) is not None for p in _projected(model))
    optimizer.zero_grad()
    assert all(optimizer.pending_gradient(p) is None for p in _projected(model))
    snapshot = [p.detach().clone() for p in model.parameters()]
    optimizer.step()  # nothing left to apply
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))


def test_checkpoints_mid_window_say_what_is_not_saved_and_loading_discards_the_window():
    x, y = regression_batch(n=64)
    model = tiny_mlp(0)
    optimizer = _build(model, GaLoreAdamW, {"lr": 1e-2}, accumulate="lowrank")
    _window(model, optimizer, x, y)
    saved = optimizer.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    _loss(model, x, y).backward()
    with pytest.warns(RuntimeWarning, match="not saved"):
        optimizer.state_dict()
    buffer.seek(0)
    with pytest.warns(RuntimeWarning, match="discarded"):
        optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(optimizer.pending_gradient(p) is None for p in _projected(model))


def test_a_basis_change_inside_a_window_is_refused_by_name():
    model, optimizer, _, _ = _mid_window()
    p = _projected(model)[0]
    state = optimizer.state[p]
    key = "basis_left" if "basis_left" in state else "basis_right"
    state[key] = state[key].clone()  # e.g. a state loaded by hand between two micro-batches
    with pytest.raises(UnsupportedSetupError, match="zero_grad"):
        optimizer.step()


def test_float32_accumulators_for_bf16_gradients():
    x, y = regression_batch(n=64)
    model = tiny_mlp(0).to(torch.bfloat16)
    optimizer = _build(model, GaLoreAdamW, {"lr": 1e-2}, accumulate="lowrank", accumulate_dtype="float32")
    _window(model, optimizer, x.bfloat16(), y.bfloat16())
    _loss(model, x.bfloat16(), y.bfloat16()).backward()
    entry = optimizer.pending_gradient(_projected(model)[0])
    assert entry.low.dtype == torch.float32 and entry.grad_dtype == torch.bfloat16
    optimizer.step()
    assert all(v.dtype == torch.bfloat16 for k, v in optimizer.state[_projected(model)[0]].items() if k.startswith("exp_"))


def test_regular_lowrank_hooks_follow_copies_and_yield_to_a_layerwise_wrapper():
    model = tiny_mlp(0)
    optimizer = _build(model, GaLoreAdamW, {"lr": 1e-2}, accumulate="lowrank")
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in _projected(model))
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters() if p.dim() == 1)
    x, y = regression_batch(n=64)
    _window(model, optimizer, x, y)
    copied_model, copied = copy.deepcopy((model, optimizer))
    _loss(copied_model, x, y).backward()  # the copy's own hooks project the copy's gradients
    assert all(p.grad is None and copied.pending_gradient(p) is not None for p in _projected(copied_model))
    assert all(optimizer.pending_gradient(p) is None for p in _projected(model))
    wrapped_model = tiny_mlp(0)
    wrapped = LayerwiseOptimizer(_build(wrapped_model, GaLoreAdamW, {"lr": 1e-2}, accumulate="lowrank"))
    reference_model = tiny_mlp(0)
    reference = _build(reference_model, GaLoreAdamW, {"lr": 1e-2})
    for _ in range(2):
        _window(wrapped_model, wrapped, x, y)
        _window(reference_model, reference, x, y)
    assert max_param_diff(wrapped_model, reference_model) <= 1e-5


def test_grad_scaler_and_more_than_one_process_are_refused(monkeypatch):
    model, optimizer, x, y = _mid_window()
    optimizer.grad_scale, optimizer.found_inf = torch.ones(()), torch.zeros(())
    with pytest.raises(UnsupportedSetupError, match="GradScaler"):
        optimizer.step()
    optimizer.zero_grad()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    with pytest.raises(UnsupportedSetupError, match="one process"):
        _loss(model, x, y).backward()


def test_the_keys_are_checked_and_reach_the_groups():
    model = tiny_mlp(0)
    with pytest.raises(GaLoreConfigError, match="`accumulate`"):
        _build(model, GaLoreAdamW, {"lr": 1e-2}, accumulate="subspace")
    with pytest.raises(GaLoreConfigError, match="`accumulate_dtype`"):
        _build(model, GaLoreAdamW, {"lr": 1e-2}, accumulate_dtype="bfloat16")
    group = _build(model, GaLoreAdamW, {"lr": 1e-2}).param_groups[1]
    assert group["accumulate"] == "auto" and group["accumulate_dtype"] is None
    assert accumulates_in_subspace(group, layerwise=True) and not accumulates_in_subspace(group, layerwise=False)
    assert not accumulates_in_subspace({**group, "accumulate": "full"}, layerwise=True)


def test_stochastic_rounding_of_bf16_weights_lands_the_subspace_step():
    """Updates far below half a bf16 spacing: with stochastic rounding both accumulations move the projected
    weights by the same amount on average (the rounding stage is shared), and round-to-nearest would not."""
    x, y = regression_batch(n=64)
    moved = {}
    for how in ("full", "lowrank"):
        model = tiny_mlp(0).to(torch.bfloat16)
        start = [p.detach().float().clone() for p in _projected(model)]
        optimizer = _build(model, GaLoreAdamW, {"lr": 1e-5}, accumulate=how)
        for _ in range(12):
            _window(model, optimizer, x.bfloat16(), y.bfloat16())
        moved[how] = torch.cat([(p.float() - s).flatten() for p, s in zip(_projected(model), start)])
    spacing = 2.0**-8 * 0.1  # bf16 spacing near |w| ~ 0.1; the per-step update is ~lr * scale
    assert 1e-5 * 0.25 < 0.01 * spacing
    assert moved["full"].abs().mean() > 0 and moved["lowrank"].abs().mean() > 0
    ratio = float(moved["lowrank"].abs().mean() / moved["full"].abs().mean())
    assert ratio == pytest.approx(1.0, abs=0.15)
    # the same rounding bits (keyed by weight and step) on nearly the same values: the same rounding decisions
    assert float((moved["full"] == moved["lowrank"]).float().mean()) > 0.9
