"""Randomized / warm-started subspace iteration against the exact SVD (the oracle)."""

from __future__ import annotations

import pytest
import torch

from hf_galore import GaLoreAdamW
from hf_galore.projectors import get_projector
from hf_galore.projectors.geometry import subspace_overlap
from hf_galore.projectors.randomized import derive_seed, randomized_basis, range_basis
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
    opt = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
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
