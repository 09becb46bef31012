"""Refresh policies: Q-GaLore's lazy refresh and the staggered exact-SVD schedule; moment rotation."""

from __future__ import annotations

import pytest
import torch

from hf_galore import GaLoreAdamW
from hf_galore.errors import GaLoreConfigError
from hf_galore.optim.lowrank import rotate_moments_
from hf_galore.optim.stats import RefreshStats


def low_rank_matrix(m: int, n: int, seed: int, columns: slice | None = None) -> torch.Tensor:
    """A rank-3 ``m × n`` matrix; with ``columns``, its row space lies in those coordinates."""
    g = torch.Generator().manual_seed(seed)
    right = torch.randn(3, n, generator=g)
    if columns is not None:
        mask = torch.zeros(n)
        mask[columns] = 1.0
        right = right * mask
    return torch.randn(m, 3, generator=g) @ right


def refresh_steps(weight, opt, grads) -> list[int]:
    """Steps (0-based) at which the weight's basis was recomputed."""
    steps = []
    for step, grad in enumerate(grads):
        before = opt.galore_stats.refreshes
        weight.grad = grad.clone()
        opt.step()
        if opt.galore_stats.refreshes > before:
            steps.append(step)
    return steps


def stationary_grads(steps: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    stationary = low_rank_matrix(24, 16, seed=1, columns=slice(0, 8))
    return [stationary + 1e-3 * torch.randn(24, 16, generator=g) for _ in range(steps)]


def qgalore_refresh_steps(grads, rank: int, gap: int) -> tuple[list[int], list[float]]:
    """Refresh steps of q-galore-torch 1.0's own projector on the same gradients (and its cosines)."""
    projector_module = pytest.importorskip("q_galore_torch.q_galore_projector")
    projector = projector_module.GaLoreProjector(
        rank, update_proj_gap=gap, cos_threshold=0.4, gamma_proj=2, queue_size=5
    )
    steps = []
    for step, grad in enumerate(grads):  # its optimizer passes state["step"], counted from 0
        before = projector.svd_count
        projector.project(grad, step)
        if projector.svd_count > before:
            steps.append(step)
    return steps, list(projector.queue)


def test_lazy_schedule_matches_q_galore_torch_on_the_same_gradients():
    """Default ``lazy_schedule="multiple"``: the next refresh is the next multiple of the grown gap."""
    weight = torch.nn.Parameter(torch.zeros(24, 16))
    opt = GaLoreAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 2, "refresh": "lazy"}], lr=1e-3)
    ours = refresh_steps(weight, opt, stationary_grads())
    # queue of 5 cosines full at step 10; then the gap doubles at each refresh: 4, 8, 16, 32
    assert ours == [0, 2, 4, 6, 8, 10, 12, 16, 32]
    assert opt.state[weight]["lazy_gap"] == 32 and opt.state[weight]["lazy_next"] == 64
    reference, cosines = qgalore_refresh_steps(stationary_grads(), rank=3, gap=2)
    assert min(cosines) > 0.99  # no sign flip: its signed cosine and our |cos| agree here
    assert reference == ours


def test_lazy_refresh_lengthens_on_stationary_gradients_and_resets_on_change():
    weight = torch.nn.Parameter(torch.zeros(24, 16))
    group = {"params": [weight], "rank": 3, "update_proj_gap": 2, "refresh": "lazy", "lazy_schedule": "offset"}
    opt = GaLoreAdamW([group], lr=1e-3)
    # "offset": the next refresh at step + gap
    assert refresh_steps(weight, opt, stationary_grads()) == [0, 2, 4, 6, 8, 10, 14, 22, 38]
    state = opt.state[weight]
    assert state["lazy_gap"] == 32 and state["lazy_next"] == 70
    assert float(state["lazy_cos"].min()) > 0.99

    # a different gradient regime: the next refresh sees a low cosine and resets the interval
    changed = low_rank_matrix(24, 16, seed=7, columns=slice(8, 16))  # orthogonal row space
    steps = refresh_steps(weight, opt, [changed] * 36)
    assert [40 + s for s in steps] == [70, 72, 74]
    assert state["lazy_gap"] == 2 and state["lazy_count"] == 2


def test_lazy_refresh_runs_once_per_refresh_with_two_sided_bases():
    """Regression (issue 13): with ``proj_type="full"`` the policy ran once per side, pushing two cosines
    and growing the gap twice per refresh."""
    grads = stationary_grads()
    schedules = {}
    for proj_type in ("std", "full"):
        weight = torch.nn.Parameter(torch.zeros(24, 16))
        group = {"params": [weight], "rank": 3, "update_proj_gap": 2, "refresh": "lazy", "proj_type": proj_type}
        opt = GaLoreAdamW([group], lr=1e-3)
        schedules[proj_type] = refresh_steps(weight, opt, grads)
        assert opt.state[weight]["lazy_gap"] == 32
    assert schedules["full"] == schedules["std"] == [0, 2, 4, 6, 8, 10, 12, 16, 32]


def test_staggered_spreads_exact_refreshes_across_steps():
    weights = [torch.nn.Parameter(torch.zeros(16, 12)) for _ in range(8)]
    per_step = {}
    for refresh in ("fixed", "staggered"):
        opt = GaLoreAdamW([{"params": weights, "rank": 2, "update_proj_gap": 4, "refresh": refresh}], lr=1e-3)
        counts = []
        for step in range(12):
            for i, w in enumerate(weights):
                w.grad = low_rank_matrix(16, 12, seed=100 * step + i)
            before = opt.galore_stats.refreshes
            opt.step()
            counts.append(opt.galore_stats.refreshes - before)
        per_step[refresh] = counts
    assert per_step["fixed"] == [8, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0, 0]
    assert per_step["staggered"] == [8] + [2] * 11
    assert sum(per_step["staggered"][1:9]) == 16  # still one refresh per weight per 4 steps


@pytest.mark.parametrize("side", ["left", "right"])
def test_rotation_expresses_the_same_moment_in_a_rotated_basis(side):
    g = torch.Generator().manual_seed(0)
    old = torch.linalg.qr(torch.randn(10, 4, generator=g)).Q
    turn = torch.linalg.qr(torch.randn(4, 4, generator=g)).Q
    new = old @ turn
    shape = (4, 7) if side == "left" else (7, 4)
    m = torch.randn(shape, generator=g)
    v = torch.rand(shape, generator=g)
    state = {"exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    rotate_moments_(state, [(side, new.t() @ old)], RefreshStats())
    if side == "left":
        assert torch.allclose(new @ state["exp_avg"], old @ m, atol=1e-5)
        assert torch.allclose(state["exp_avg_sq"], (turn.t().square()) @ v, atol=1e-6)
    else:
        assert torch.allclose(state["exp_avg"] @ new.t(), m @ old.t(), atol=1e-5)
        assert torch.allclose(state["exp_avg_sq"], v @ turn.square(), atol=1e-6)
    assert torch.all(state["exp_avg_sq"] >= 0)


def test_rotate_moments_only_changes_refresh_steps():
    results = {}
    for rotate in (False, True):
        weight = torch.nn.Parameter(torch.zeros(12, 20))
        opt = GaLoreAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 3, "rotate_moments": rotate}], lr=1e-2)
        moments = []
        for step in range(5):
            weight.grad = low_rank_matrix(12, 20, seed=step)
            opt.step()
            moments.append(opt.state[weight]["exp_avg"].clone())
        results[rotate] = moments
    for step in range(3):  # first refresh at step 3
        assert torch.equal(results[False][step], results[True][step])
    assert not torch.allclose(results[False][3], results[True][3])


@pytest.mark.parametrize(
    "key,value",
    [
        ("lazy_gamma", 0.5),
        ("lazy_queue", 0),
        ("oversample", -1),
        ("rotate_moments", "yes"),
        ("quant_group_size", 0),
        ("lazy_schedule", "next"),
        ("osd_order", "after"),
        ("energy_threshold", 1.5),
        ("energy_iters", -1),
    ],
)
def test_bad_keys_are_refused(key, value):
    with pytest.raises(GaLoreConfigError, match=f"`{key}`"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "rank": 2, key: value}])
