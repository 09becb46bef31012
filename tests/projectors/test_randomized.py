"""Randomized / warm-started subspace iteration against the exact SVD (the oracle)."""

from __future__ import annotations

import pytest
import torch

from hf_galore import GaLoreAdamW
from hf_galore.projectors import get_projector
from hf_galore.projectors.geometry import subspace_overlap
from hf_galore.projectors.randomized import (
    _subspace,
    captured_energy_ratio,
    derive_seed,
    randomized_basis,
    range_basis,
    ritz_basis,
)
from hf_galore.projectors.svd import top_singular_basis
from tests.helpers import regression_batch, split_groups, tiny_mlp, train


def decaying(m: int, n: int, decay: float = 0.85, seed: int = 0) -> torch.Tensor:
    """``U diag(decay^i) Vᵀ`` with random orthonormal U, V: a gradient-like spectrum."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    return (u * decay ** torch.arange(k, dtype=torch.float32)) @ v.t()


def energy(matrix: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    projected = basis.t() @ matrix if side == "left" else matrix @ basis
    return float(projected.square().sum() / matrix.square().sum())


# (m, n, rank, side)
CASES = [(96, 64, 8, "left"), (96, 64, 8, "right"), (40, 150, 12, "left"), (40, 150, 12, "right")]


@pytest.mark.parametrize("m,n,rank,side", CASES)
def test_cold_start_spans_exact_subspace(m, n, rank, side):
    g = decaying(m, n)
    exact = top_singular_basis(g, rank, side)
    approx = randomized_basis(g, rank, side, previous=None, step=0, group={})
    assert approx.shape == exact.shape and approx.dtype == torch.float32
    assert torch.allclose(approx.t() @ approx, torch.eye(rank), atol=1e-5)
    # mean squared cosine of the principal angles
    assert subspace_overlap(exact, approx) > 0.999
    assert energy(g, approx, side) >= 0.9999 * energy(g, exact, side)


@pytest.mark.parametrize("side", ["left", "right"])
def test_warm_start_tracks_a_drifting_subspace(side):
    g0 = decaying(120, 80, seed=1)
    g1 = g0 + 0.05 * decaying(120, 80, seed=2)  # the next refresh: a perturbed gradient
    previous = top_singular_basis(g0, 10, side)
    warm = randomized_basis(g1, 10, side, previous=previous, step=5, group={"warm_iters": 1})
    exact = top_singular_basis(g1, 10, side)
    assert energy(g1, warm, side) >= 0.999 * energy(g1, exact, side)
    # without the warm start, a single round from random directions is worse
    cold = randomized_basis(g1, 10, side, previous=None, step=5, group={"power_iters": 0, "oversample": 0})
    assert energy(g1, warm, side) > energy(g1, cold, side)


def test_deterministic_and_seeded():
    g = torch.randn(64, 48)
    a = randomized_basis(g, 6, "right", previous=None, step=3, group={})
    b = randomized_basis(g, 6, "right", previous=None, step=3, group={})
    c = randomized_basis(g, 6, "right", previous=None, step=3, group={"proj_seed": 1, "power_iters": 0})
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_range_basis_is_sorted_by_energy():
    g = decaying(50, 50, decay=0.7)
    basis = range_basis(g, 5, oversample=5, iters=2, seed=0)
    col_energy = (basis.t() @ g).square().sum(dim=1)
    assert torch.all(col_energy[:-1] >= col_energy[1:])


def test_optimizer_with_randomized_projector_trains_like_svd():
    """Same model, same data: the randomized basis reaches the exact-SVD loss within 5%."""
    losses = {}
    for projector in ("svd", "randomized"):
        model = tiny_mlp()
        opt = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=5, projector=projector), lr=1e-2)
        train(model, opt, steps=15)
        x, y = regression_batch(1)
        losses[projector] = (model(x) - y).square().mean().item()
    start = (tiny_mlp()(x) - y).square().mean().item()
    assert losses["svd"] < 0.9 * start
    assert losses["randomized"] == pytest.approx(losses["svd"], rel=0.05)


def train_with_broken_svd(monkeypatch) -> GaLoreAdamW:
    finder = get_projector("svd")

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(type(finder), "find", broken)
    model = tiny_mlp()
    opt = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=2, projector="svd"), lr=1e-2)
    with pytest.warns(RuntimeWarning, match="randomized"):
        train(model, opt, steps=3)
    for p in model.parameters():
        if p.dim() == 2:
            assert "basis_left" in opt.state[p] or "basis_right" in opt.state[p]
    return opt


def test_svd_failure_falls_back_to_randomized(monkeypatch):
    stats = train_with_broken_svd(monkeypatch).galore_stats
    assert stats.fallbacks == 3 * 2  # 3 weights x refreshes at steps 0 and 2
    assert stats.refresh_failures == 0


@pytest.mark.slow  # imports transformers
def test_fallbacks_are_logged_by_the_callback(monkeypatch):
    from hf_galore.callback import GaLoreCallback

    callback = GaLoreCallback()
    callback._optimizer = train_with_broken_svd(monkeypatch)
    logged = callback.stats()
    assert logged["galore/fallbacks"] == 6 and "galore/refresh_failures" not in logged
    assert "galore/energy_fallbacks" not in logged  # the randomized fallback does not guard itself


@pytest.mark.slow  # imports transformers
def test_energy_fallbacks_are_logged_by_the_callback():
    from hf_galore.callback import GaLoreCallback

    weight = torch.nn.Parameter(torch.zeros(48, 32))
    opt = GaLoreAdamW([{"params": [weight], "rank": 6, "projector": "randomized"}], lr=1e-3)
    weight.grad = flat(48, 32)
    opt.step()
    callback = GaLoreCallback()
    callback._optimizer = opt
    assert callback.stats()["galore/energy_fallbacks"] == 1


@pytest.mark.parametrize("oversample,warm_iters", [(0, 0), (8, 1)])
def test_warm_start_from_a_quantized_basis_is_orthonormal(oversample, warm_iters):
    """An INT4-stored basis is only nearly orthonormal; the refreshed one must be exactly so."""
    from hf_galore.projectors.storage import get_codec

    g = decaying(64, 40)
    state: dict = {}
    codec = get_codec("int4")
    codec.encode(state, "b", top_singular_basis(g, 6, "right"), torch.float32, group={"quant_group_size": 64})
    previous = codec.decode(state, "b")
    assert not torch.allclose(previous.t() @ previous, torch.eye(6), atol=1e-3)
    group = {"oversample": oversample, "warm_iters": warm_iters}
    basis = randomized_basis(g, 6, "right", previous=previous, step=1, group=group)
    assert torch.allclose(basis.t() @ basis, torch.eye(6), atol=1e-5)
    assert energy(g, basis, "right") >= 0.99 * energy(g, top_singular_basis(g, 6, "right"), "right")


# ------------------------------------------------------------------ energy guard
def flat(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A Gaussian matrix: a flat (Marchenko–Pastur) spectrum, the randomized finder's hard case."""
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def unrelated_basis(k: int, rank: int, seed: int = 9) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(k, rank, generator=torch.Generator().manual_seed(seed))).Q


def exact_energy(g: torch.Tensor, rank: int) -> float:
    return float(torch.linalg.svdvals(g.double())[:rank].square().sum() / g.double().square().sum())


@pytest.mark.parametrize("kind", ["flat", "decaying"])
@pytest.mark.parametrize("start", ["cold", "warm_unrelated"])
@pytest.mark.parametrize("iters", [1, 3])
def test_energy_estimate_never_exceeds_the_true_ratio(kind, start, iters):
    """After >= 1 round, ``captured_energy_ratio`` is a lower bound of (found energy) / (exact top-r energy)."""
    g = flat(120, 90) if kind == "flat" else decaying(120, 90, decay=0.9)
    previous = unrelated_basis(120, 10) if start == "warm_unrelated" else None
    q = _subspace(g, 10, oversample=8, iters=iters, seed=1, start=previous)
    basis, theta, b = ritz_basis(g, q, 10)
    estimate, _ = captured_energy_ratio(g, q, theta, b, 10)
    true = energy(g, basis, "left") / exact_energy(g, 10)
    assert estimate <= true + 1e-6
    if kind == "decaying":
        assert estimate > 0.99  # tight enough where the spectrum has a gap


@pytest.mark.parametrize("start", ["cold", "warm_unrelated"])
def test_flat_spectrum_reaches_099_of_exact_energy(start):
    g = flat(160, 96)
    previous = unrelated_basis(160, 12) if start == "warm_unrelated" else None
    finder = get_projector("randomized")
    exact = exact_energy(g, 12)
    unguarded = finder.find(g, 12, "left", previous=previous, state={}, group={"energy_threshold": 0.0})
    assert energy(g, unguarded, "left") < 0.97 * exact  # what the issue measured: 0.81-0.96
    state: dict = {}
    guarded = finder.find(g, 12, "left", previous=previous, state=state, group={})
    assert energy(g, guarded, "left") >= 0.99 * exact
    assert state["energy_fallbacks"] == 1  # 2 more rounds do not prove 0.99 here: exact SVD
    # a larger budget of rounds proves it without the SVD
    state = {}
    iterated = finder.find(g, 12, "left", previous=previous, state=state, group={"energy_iters": 40})
    assert "energy_fallbacks" not in state
    assert energy(g, iterated, "left") >= 0.99 * exact


@pytest.mark.parametrize("start", ["cold", "warm_unrelated"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_decaying_spectrum_takes_the_fast_path(start, side):
    g = decaying(96, 64)
    k = 96 if side == "left" else 64
    previous = unrelated_basis(k, 8) if start == "warm_unrelated" else None
    finder = get_projector("randomized")
    state: dict = {}
    guarded = finder.find(g, 8, side, previous=previous, state=state, group={})
    unguarded = finder.find(g, 8, side, previous=previous, state={}, group={"energy_threshold": 0.0})
    assert torch.equal(guarded, unguarded)  # no extra round, no SVD
    assert "energy_fallbacks" not in state
    assert energy(g, guarded, side) >= 0.99 * exact_energy(g, 8)


def test_no_round_no_trust():
    """With ``warm_iters=0`` the guard runs one round before it trusts its estimate."""
    g = decaying(96, 64)
    previous = unrelated_basis(96, 8)
    finder = get_projector("randomized")
    group = {"warm_iters": 0}
    guarded = finder.find(g, 8, "left", previous=previous, state={}, group=group)
    one_round = finder.find(g, 8, "left", previous=previous, state={}, group={"warm_iters": 1, "energy_threshold": 0})
    assert torch.allclose(guarded, one_round, atol=1e-6)


def test_energy_fallbacks_are_counted_by_the_optimizer():
    weights = [torch.nn.Parameter(torch.zeros(48, 32)) for _ in range(2)]
    group = {"params": weights, "rank": 6, "update_proj_gap": 2, "projector": "randomized"}
    opt = GaLoreAdamW([group], lr=1e-3)
    for step in range(4):  # refreshes at steps 0 and 2
        weights[0].grad = flat(48, 32, seed=step)
        weights[1].grad = decaying(48, 32, seed=step)
        opt.step()
    assert opt.galore_stats.refreshes == 4
    assert opt.galore_stats.energy_fallbacks == opt.state[weights[0]]["energy_fallbacks"] == 2
    assert "energy_fallbacks" not in opt.state[weights[1]]
