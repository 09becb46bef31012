"""A gradient holding NaN/Inf skips the step: weights and every state tensor stay bit-identical.

Regular mode skips the whole step (GradScaler's semantics), so a run with a
poisoned step in it must end exactly where the same run without that step
ends (same step counters, same refresh schedule). Layer-wise mode skips per
weight: only the weight that got the bad gradient keeps its values.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from hf_galore import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreConfig,
    GaLoreConfigError,
    LayerwiseOptimizer,
    galore_param_groups,
)
from hf_galore.optim.base import nonfinite_flag
from tests.helpers import tiny_mlp

pytest.importorskip("bitsandbytes")

MEMBERS = {
    "adamw": (GaLoreAdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "adamw8bit": (GaLoreAdamW8bit, {"lr": 1e-2, "weight_decay": 0.1}),
    "adafactor": (GaLoreAdafactor, {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9}),
}
#: refresh every 3 steps: step 3 refreshes, step 4 does not
GAP = 3
CASES = [(3, float("nan")), (4, float("inf")), (4, float("-inf"))]


class TwoWeights(nn.Module):
    """A projected weight whose low-rank moments are 8-bit sized (8 x 640 >= 4096) and two full-rank ones."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(64, 640) * 0.1)
        self.big = nn.Parameter(torch.randn(5000) * 0.1)  # 8-bit states at full rank
        self.small = nn.Parameter(torch.randn(7) * 0.1)

    def loss(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(16, 640, generator=g)
        c = torch.randn(5000, generator=g)
        return (x @ self.w.t()).tanh().square().mean() + (self.big * c).sum() + self.small.square().sum()


def _groups(model: TwoWeights, **lowrank) -> list[dict]:
    keys = {"rank": 8, "update_proj_gap": GAP, **lowrank}
    return [{"params": [model.big, model.small]}, {"params": [model.w], **keys}]


def _grads(seed: int) -> list[torch.Tensor]:
    model = TwoWeights()
    model.loss(seed).backward()
    return [model.w.grad, model.big.grad, model.small.grad]


def _poison(grad: torch.Tensor, value: float) -> torch.Tensor:
    grad = grad.clone()
    grad.view(-1)[5] = value
    return grad


def _run(
    member: str, grad_sets: list[list[torch.Tensor]], dtype: torch.dtype = torch.float32, **lowrank
) -> tuple[TwoWeights, torch.optim.Optimizer]:
    cls, kwargs = MEMBERS[member]
    model = TwoWeights().to(dtype)
    opt = cls(_groups(model, **lowrank), **kwargs)
    params = [model.w, model.big, model.small]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for grads in grad_sets:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    return model, opt


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def _assert_same(model_a, opt_a, model_b, opt_b) -> None:
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        _assert_same_state(opt_a.state[p], opt_b.state[q])


@pytest.mark.parametrize("member", sorted(MEMBERS))
@pytest.mark.parametrize("bad_step,value", CASES)
@pytest.mark.parametrize("target", [0, 1])  # the projected weight, the big full-rank one
def test_a_skipped_step_is_as_if_it_never_happened(member, bad_step, value, target):
    clean = [_grads(seed) for seed in range(6)]
    bad = list(clean[bad_step])
    bad[target] = _poison(bad[target], value)
    poisoned = clean[:bad_step] + [bad] + clean[bad_step:]
    model_a, opt_a = _run(member, poisoned)
    model_b, opt_b = _run(member, clean)
    _assert_same(model_a, opt_a, model_b, opt_b)
    assert opt_a.galore_stats.skipped_steps == 1
    assert opt_b.galore_stats.skipped_steps == 0
    assert int(opt_a.state[model_a.w]["step"]) == 6
    assert all(torch.isfinite(p).all() for p in model_a.parameters())


@pytest.mark.parametrize(
    "lowrank",
    [
        {"projector": "online_pca"},
        {"projector": "randomized"},
        {"refresh": "lazy"},
        {"refresh": "staggered"},
        {"rotate_moments": True},
        {"quant": "int8"},
    ],
)
@pytest.mark.parametrize("bad_step", [3, 4])  # a refresh step, a step between refreshes
def test_tracked_basis_and_policy_state_are_kept(lowrank, bad_step):
    """OSD moves its basis every step and keeps its own Adam state; the lazy policy keeps a FIFO."""
    clean = [_grads(seed) for seed in range(6)]
    bad = [clean[bad_step][0], _poison(clean[bad_step][1], float("nan")), clean[bad_step][2]]  # another weight's
    model_a, opt_a = _run("adamw", clean[:bad_step] + [bad] + clean[bad_step:], **lowrank)
    model_b, opt_b = _run("adamw", clean, **lowrank)
    _assert_same(model_a, opt_a, model_b, opt_b)


@pytest.mark.parametrize("member", sorted(MEMBERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_guard_changes_nothing_on_finite_steps(member, dtype):
    grads = [[g.to(dtype) for g in _grads(seed)] for seed in range(5)]
    model_a, opt_a = _run(member, grads, dtype=dtype)
    cls, kwargs = MEMBERS[member]
    model_b = TwoWeights().to(dtype)
    groups = _groups(model_b)
    for group in groups:
        group["skip_nonfinite"] = False
    opt_b = cls(groups, **kwargs)
    params = [model_b.w, model_b.big, model_b.small]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt_b.step()
    _assert_same(model_a, opt_a, model_b, opt_b)


def test_guard_off_is_torch_adamw_also_on_a_nan_step():
    """``skip_nonfinite=False``: the full-rank group is torch.optim.AdamW, NaN included."""
    torch.manual_seed(0)
    ours_p = nn.Parameter(torch.randn(33))
    ref_p = nn.Parameter(ours_p.detach().clone())
    ours = GaLoreAdamW([{"params": [ours_p], "skip_nonfinite": False}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([ref_p], lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(4):
        g = torch.randn(33)
        if step == 2:
            g[3] = float("nan")
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=0, equal_nan=True)  # bit-equal, NaN where torch has it
    assert torch.isnan(ours_p).any()
    assert ours.galore_stats.skipped_steps == 0


def test_skip_is_warned_once_and_counted_per_step():
    clean = [_grads(seed) for seed in range(3)]
    bad = [_poison(clean[1][0], float("nan")), *clean[1][1:]]
    cls, kwargs = MEMBERS["adamw"]
    model = TwoWeights()
    opt = cls(_groups(model), **kwargs)
    params = [model.w, model.big, model.small]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for grads in [clean[0], bad, bad, clean[2]]:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert sum("was skipped" in str(w.message) and w.category is RuntimeWarning for w in record) == 1
    assert opt.galore_stats.skipped_steps == 2
    assert opt.galore_stats.as_dict()["skipped_steps"] == 2


def test_nonfinite_flag_sees_nan_and_both_infinities_in_any_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        finite = [torch.ones(3, dtype=dtype), torch.full((2, 2), 1e4, dtype=dtype)]
        assert float(nonfinite_flag(finite)) == 0.0
        for value in (float("nan"), float("inf"), float("-inf")):
            bad = finite + [torch.tensor([0.0, value], dtype=dtype)]
            assert float(nonfinite_flag(bad)) == 1.0
    assert nonfinite_flag([]) is None


# ------------------------------------------------------------------- layer-wise
def _clone_state(state: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}


@pytest.mark.parametrize("member", sorted(MEMBERS))
@pytest.mark.parametrize("bad_step,value", CASES[:2])
def test_layerwise_skips_only_the_weight_that_got_it(member, bad_step, value):
    cls, kwargs = MEMBERS[member]
    model = TwoWeights()
    opt = LayerwiseOptimizer(cls(_groups(model), **kwargs))
    current = {"step": -1}

    def poison(grad):
        return _poison(grad, value) if current["step"] == bad_step else grad

    model.w.register_hook(poison)  # runs before accumulation, so the update hook sees the bad gradient
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(6):
            current["step"] = step
            if step == bad_step:
                w_before, w_state = model.w.detach().clone(), _clone_state(opt.state[model.w])
                big_before = model.big.detach().clone()
            model.loss(step).backward()
            opt.step()
            opt.zero_grad()
            if step == bad_step:
                assert torch.equal(model.w, w_before)
                _assert_same_state(opt.state[model.w], w_state)
                assert not torch.equal(model.big, big_before)  # the other weights stepped
    assert opt.galore_stats.skipped_steps == 1
    assert int(opt.state[model.w]["step"]) == 5 and int(opt.state[model.big]["step"]) == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ GradScaler
def test_grad_scaler_skips_inf_steps_through_the_fused_path():
    """GradScaler hands step() its scale and found_inf; with powers of two the run is exact."""
    clean = [_grads(seed) for seed in range(4)]
    model_b, opt_b = _run("adamw", clean)

    cls, kwargs = MEMBERS["adamw"]
    model = TwoWeights()
    opt = cls(_groups(model), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    params = [model.w, model.big, model.small]
    scales = []
    sequence = clean[:2] + [[_poison(clean[2][0], float("inf")), *clean[2][1:]]] + clean[2:]
    for grads in sequence:
        scale = float(scaler.scale(torch.ones(())))  # as scaler.scale(loss) before backward
        scales.append(scale)
        for p, g in zip(params, grads):
            p.grad = g * scale  # what backward of scaler.scale(loss) gives
        scaler.step(opt)
        scaler.update()
    assert scales == [2.0**10, 2.0**10, 2.0**10, 2.0**9, 2.0**9]
    assert opt.galore_stats.skipped_steps == 1
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), model_b.parameters()):
        _assert_same_state(opt.state[p], opt_b.state[q])


# --------------------------------------------------------------------- setting
def test_skip_nonfinite_reaches_every_group_from_optim_args():
    model = tiny_mlp()
    config = GaLoreConfig.from_optim_args("rank=4, skip_nonfinite=false", target_modules=["0", "2"])
    opt = GaLoreAdamW(galore_param_groups(model, config))
    assert [g["skip_nonfinite"] for g in opt.param_groups] == [False] * len(opt.param_groups)
    default = GaLoreAdamW(galore_param_groups(model, GaLoreConfig(rank=4, target_modules=["0", "2"])))
    assert all(g["skip_nonfinite"] is True for g in default.param_groups) and len(default.param_groups) > 1


def test_a_bad_skip_nonfinite_value_is_named():
    with pytest.raises(GaLoreConfigError, match="`skip_nonfinite` must be one of"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.ones(3))], "skip_nonfinite": "yes"}])


@pytest.mark.parametrize("member", sorted(MEMBERS))
@pytest.mark.parametrize("target", [0, 1])
def test_a_skipped_step_with_stochastically_rounded_bf16_weights(member, target):
    """bf16 weights are written with stochastic rounding: a zero step and a unit decay give them back unchanged."""
    clean = [[g.to(torch.bfloat16) for g in _grads(seed)] for seed in range(6)]
    bad = list(clean[4])
    bad[target] = _poison(bad[target], float("nan"))
    model_a, opt_a = _run(member, clean[:4] + [bad] + clean[4:], dtype=torch.bfloat16)
    model_b, opt_b = _run(member, clean, dtype=torch.bfloat16)
    assert all(g["stochastic_rounding"] for g in opt_a.param_groups)
    _assert_same(model_a, opt_a, model_b, opt_b)
    assert opt_a.galore_stats.skipped_steps == 1


# ------------------------------------------------------- per dtype (issue 26)
@pytest.mark.parametrize(
    "dtype, fill, spike, flagged",
    [
        # a square beyond float32's range: Adam's second moment would be infinite, the weight stuck forever
        (torch.bfloat16, 0.5, 2e19, True),
        (torch.float32, 0.5, 2e19, True),
        (torch.bfloat16, 0.5, 1e18, False),
        # fp16 values never overflow a float32 sum: a 64x64 gradient of 20.0 (fp16 sum 81920 > 65504) is fine
        (torch.float16, 20.0, 20.0, False),
        (torch.float16, 60000.0, 60000.0, False),
        (torch.float16, 0.5, float("inf"), True),
        (torch.float16, 0.5, float("nan"), True),
        (torch.bfloat16, 0.5, float("nan"), True),
    ],
)
def test_the_flag_follows_each_dtypes_range(dtype, fill, spike, flagged):
    """Issue 26: bf16 gradients >= ~1.8e19 were not flagged (exp_avg_sq became inf) and fp16 gradients whose
    sum passed 65504 were flagged, so every step was skipped."""
    grad = torch.full((64, 64), fill, dtype=dtype)
    grad[3, 5] = spike
    for tensor in (grad, grad.t()):  # contiguous and transposed layouts
        assert float(nonfinite_flag([tensor])) == float(flagged)


def test_an_fp16_model_with_large_gradients_still_steps():
    w = nn.Parameter(torch.zeros(64, 64, dtype=torch.float16))
    opt = GaLoreAdamW([{"params": [w], "rank": 8}], lr=1e-2)
    for _ in range(3):
        w.grad = torch.full((64, 64), 20.0, dtype=torch.float16)
        opt.step()
    assert opt.galore_stats.skipped_steps == 0 and float(w.detach().float().abs().max()) > 0
