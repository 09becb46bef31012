"""Online Subspace Descent (arXiv:2408.12857): loss gradient, PCA residual, no SVD after the first basis."""

from __future__ import annotations

import pytest
import torch

from hf_galore import GaLoreAdamW
from hf_galore.projectors import get_projector
from hf_galore.projectors.online_pca import online_pca_loss_grad, pca_residual
from hf_galore.projectors.svd import top_singular_basis
from tests.helpers import split_groups, tiny_mlp, train
from tests.projectors.test_randomized import decaying


@pytest.mark.parametrize("k,n,r,lam", [(20, 30, 4, 0.1), (30, 12, 5, 0.0), (8, 8, 8, 1.0)])
def test_loss_gradient_matches_autograd(k, n, r, lam):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(k, n, generator=g, dtype=torch.float64)
    p = torch.randn(k, r, generator=g, dtype=torch.float64).requires_grad_(True)
    a_n = a / a.norm()
    loss = (p @ p.t() @ a_n - a_n).square().sum() + lam * (p.t() @ p - torch.eye(r, dtype=a.dtype)).square().sum()
    loss.backward()
    ours_loss, ours_grad = online_pca_loss_grad(a.float(), p.detach().float(), lam)
    assert ours_loss == pytest.approx(loss.item(), rel=1e-4)
    assert torch.allclose(ours_grad.double(), p.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_online_steps_reduce_the_pca_residual(side):
    """From a random basis, OSD's steps on a stationary gradient stream approach the exact residual."""
    finder = get_projector("online_pca")
    stream = [decaying(40, 30, decay=0.6)] * 150
    k = 40 if side == "left" else 30
    basis = torch.linalg.qr(torch.randn(k, 4, generator=torch.Generator().manual_seed(5))).Q
    state: dict = {}
    group = {"lr": 0.002, "osd_alpha": 5.0, "osd_lambda": 0.1}
    residuals = [pca_residual(stream[0], basis, side)]
    for g in stream:
        basis = finder.track(g, basis, side, state=state, group=group)
        residuals.append(pca_residual(g, basis, side))
    best = pca_residual(stream[0], top_singular_basis(stream[0], 4, side), side)
    assert residuals[50] < residuals[0]
    assert residuals[-1] < 0.5 * residuals[0]
    assert residuals[-1] < best + 0.02
    assert float(state[f"osd_{side}_step"]) == 150
    # the penalty keeps the columns nearly orthonormal
    assert torch.allclose(basis.t() @ basis, torch.eye(4), atol=0.05)


def test_one_svd_then_none(monkeypatch):
    """Only the first basis comes from an SVD; later refreshes and steps are online updates."""
    calls = []
    real_svd = torch.linalg.svd

    def counting_svd(*args, **kwargs):
        calls.append(1)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    model = tiny_mlp()
    opt = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=3, projector="online_pca"), lr=1e-2)
    first = {}
    train(model, opt, steps=1)
    for p in model.parameters():
        if p.dim() == 2:
            first[p] = {k: v.clone() for k, v in opt.state[p].items() if k.startswith("basis_")}
    assert len(calls) == 3
    train(model, opt, steps=6)
    assert len(calls) == 3
    moved = 0
    for p, bases in first.items():
        for key, value in bases.items():
            moved += int(not torch.equal(opt.state[p][key], value))
            side = key.removeprefix("basis_")
            assert float(opt.state[p][f"osd_{side}_step"]) == 6
    assert moved == 3
