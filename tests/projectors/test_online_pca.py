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


def reference_osd(grads: list[torch.Tensor], rank: int, lr: float, beta1: float):
    """The official OSD order, re-implemented with autograd and ``torch.optim.Adam``.

    kyleliang919/Online-Subspace-Descent ``galore_projector.py`` (``proj_type="continuous"``,
    left side): the first gradient only gives P (SVD); from then on ``project`` takes the
    gradient of ``‖P PᵀG̃ − G̃‖²`` at the current P and projects G with that P, and
    ``project_back`` steps P's optimizer afterwards. Settings lined up with ours: Adam
    without weight decay at lr ``α·lr`` and no orthogonality term (``osd_lambda=0``).
    Returns the first moment of the projected gradients and P after every step.
    """
    u, _, _ = torch.linalg.svd(grads[0], full_matrices=False)  # float32, as the official code
    p = u[:, :rank].clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    exp_avg = torch.zeros(rank, grads[0].shape[1])
    moments, bases = [], []
    for t, g in enumerate(grads):
        if t > 0:
            opt.zero_grad()
            gn = g / g.norm()
            (p @ p.t() @ gn - gn).square().sum().backward()
        exp_avg = beta1 * exp_avg + (1 - beta1) * (p.detach().t() @ g)  # projected with P_t
        if t > 0:
            opt.step()  # P_{t+1}
        moments.append(exp_avg.clone())
        bases.append(p.detach().clone())
    return moments, bases


def osd_run(grads: list[torch.Tensor], rank: int, lr: float, alpha: float, order: str | None):
    weight = torch.nn.Parameter(torch.zeros(grads[0].shape))
    group = {"params": [weight], "rank": rank, "update_proj_gap": 4, "projector": "online_pca"}
    group.update(osd_alpha=alpha, osd_lambda=0.0)
    if order is not None:
        group["osd_order"] = order
    opt = GaLoreAdamW([group], lr=lr, weight_decay=0.0)
    moments, bases = [], []
    for g in grads:
        weight.grad = g.clone()
        opt.step()
        moments.append(opt.state[weight]["exp_avg"].clone())
        bases.append(opt.state[weight]["basis_left"].clone())
    return moments, bases


def test_default_order_matches_the_official_osd_code_on_the_same_gradients():
    """Default ``osd_order`` = project with P_t, then step P (OSD Alg. 1 and its code); the
    other order differs on the same inputs (refresh steps 0, 4, 8 included: update_proj_gap=4)."""
    g = torch.Generator().manual_seed(3)
    base = decaying(12, 20, decay=0.7, seed=4)
    grads = [base + 0.3 * torch.randn(12, 20, generator=g) for _ in range(10)]
    lr, alpha, rank = 1e-2, 5.0, 3
    ref_moments, ref_bases = reference_osd(grads, rank, alpha * lr, beta1=0.9)
    for order in (None, "project_then_update"):
        moments, bases = osd_run(grads, rank, lr, alpha, order)
        for t in range(len(grads)):
            assert torch.allclose(bases[t], ref_bases[t], atol=2e-6), t
            assert torch.allclose(moments[t], ref_moments[t], atol=2e-6), t
    moments, bases = osd_run(grads, rank, lr, alpha, "update_then_project")
    assert torch.allclose(bases[-1], ref_bases[-1], atol=2e-6)  # P follows the same path ...
    gap = max(float((m - r).abs().max()) for m, r in zip(moments[1:], ref_moments[1:]))
    assert gap > 1e-2  # ... but G_t is projected with P_{t+1} instead of P_t
