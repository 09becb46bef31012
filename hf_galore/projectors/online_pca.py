"""Online Subspace Descent: the basis follows the gradients by online PCA (arXiv:2408.12857).

Instead of an SVD every ``T`` steps, OSD moves ``P`` a little at *every*
step with its own optimizer on the online-PCA objective (paper, Alg. 1):

    L(P) = ‖P Pᵀ G̃ − G̃‖²_F + λ ‖PᵀP − I‖²_F,   G̃ = G / ‖G‖_F

(left side; the right side uses ``Gᵀ``). Choices, where the OSD paper and its official code differ:

* **loss**: the paper's, *with* the orthogonality penalty (the official code
  drops it); ``λ = osd_lambda`` defaults to the paper's 0.1.
* **optimizer of P**: Adam, as the paper recommends, betas (0.9, 0.999),
  eps 1e-8, no weight decay on ``P`` (the penalty already keeps its columns
  near unit length; decay would fight it).
* **lr of P**: ``osd_alpha × lr`` of the weight's group, read at every step so
  it follows the learning-rate schedule; ``α = 5`` as in every paper run
  (the code instead uses ``lr_t / (lr_0 · update_proj_gap)``).
* **first basis**: one exact SVD of the first gradient (as the official
  code); no SVD after that. A refresh due under the group's ``refresh``
  policy is just another online step.
* **order** (group key ``osd_order``): ``"project_then_update"`` (default)
  projects ``G_t`` with ``P_t``, projects the step back with ``P_t`` and only
  then moves ``P_{t+1} = P_t − Adam(∇L_t(P_t))``, as Alg. 1 writes it
  (``ĝ_t = P_tᵀ g_t`` and ``θ_{t+1} = θ_t + η(P_t Δ̂_t …)`` use ``P_t``; the
  step on ``∇_P L_t(P_t)`` yields ``P_{t+1}``) and as the official code
  runs it (its ``project`` takes the gradient of the loss at the old
  ``P``, its ``project_back`` steps ``P`` afterwards).
  ``"update_then_project"`` moves ``P`` with ``G_t`` first and projects
  ``G_t`` with the moved basis (hf_galore's earlier behaviour); the
  projection then already sees a basis that moved towards ``G_t``.

``P`` is therefore only approximately orthonormal (the penalty keeps it
close); projection and back-projection use it as is, like the paper. The
Adam state of ``P`` (two ``k × r`` float32 tensors per side) triples the
basis' memory: OSD trades that for never paying an SVD spike. With
``quant="int8"/"int4"`` the basis is requantized after each step, so moves
smaller than half a quantization step are lost; prefer ``quant=None`` here.
"""

from __future__ import annotations

import torch

from ..declare import Option, StateTensor, check_non_negative, check_positive, one_of
from ..numerics import all_finite
from .base import BasisFinder, Side
from .geometry import side_size
from .svd import top_singular_basis

#: Values of ``osd_order``: when the basis moves relative to projecting this step's gradient.
OSD_ORDERS = ("project_then_update", "update_then_project")
#: Group keys read here, with their defaults (paper §5.3 / App. A.1).
OPTIONS = (
    Option("osd_alpha", 5.0, check_positive, "learning rate of the basis = osd_alpha x lr"),
    Option("osd_lambda", 0.1, check_non_negative, "weight of the orthogonality penalty"),
    Option(
        "osd_order",
        "project_then_update",
        one_of(*OSD_ORDERS),
        "project with P_t then move P (OSD Alg. 1), or move P first",
    ),
)
ONLINE_PCA_DEFAULTS = {option.name: option.default for option in OPTIONS}
OSD_BETAS = (0.9, 0.999)
OSD_EPS = 1e-8


def online_pca_loss_grad(a: torch.Tensor, p: torch.Tensor, lam: float) -> tuple[float, torch.Tensor]:
    """Loss and gradient of ``‖P PᵀÃ − Ã‖² + λ‖PᵀP − I‖²`` with ``Ã = a/‖a‖`` (``a``: ``k × n``).

    Two ``k × n × r`` products, no ``k × n`` temporary besides ``Ã``:
    with ``R = PᵀÃ`` and ``S = Ã Rᵀ``,
    ``∇ = 2(P R Rᵀ − 2S + S PᵀP) + 4λ P(PᵀP − I)``.
    """
    a = a.float()
    a = a / a.norm().clamp_min(torch.finfo(a.dtype).tiny)
    p = p.float()
    r = p.t() @ a
    s = a @ r.t()
    gram = p.t() @ p
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    rrt = r @ r.t()
    # ‖PR − Ã‖² = tr(Rᵀ PᵀP R) − 2 tr(RᵀR) + ‖Ã‖²  (‖Ã‖ = 1)
    residual = float((gram * rrt).sum() - 2 * rrt.trace() + 1.0)
    ortho = gram - eye
    loss = residual + lam * float(ortho.square().sum())
    grad = 2.0 * (p @ rrt - 2.0 * s + s @ gram) + (4.0 * lam) * (p @ ortho)
    return loss, grad


def pca_residual(matrix: torch.Tensor, basis: torch.Tensor, side: Side) -> float:
    """``‖G − P PᵀG‖² / ‖G‖²`` (left) or ``‖G − G P Pᵀ‖² / ‖G‖²`` (right), in [0, 1] for orthonormal ``P``."""
    a = matrix.float() if side == "left" else matrix.float().t()
    p = basis.float()
    return float((a - p @ (p.t() @ a)).square().sum() / a.square().sum())


class OnlinePCAFinder(BasisFinder):
    """Online Subspace Descent: one Adam step on the online-PCA loss per optimizer step.

    Group keys: ``osd_alpha`` (5.0: lr of P = α × lr), ``osd_lambda`` (0.1),
    ``osd_order`` ("project_then_update"; read by ``optim/lowrank.py``, which
    decides whether the step is projected before or after :meth:`track`).
    """

    name = "online_pca"
    tracks_every_step = True
    options = OPTIONS

    def state_layout(self, shape, rank, sides, group):
        """Adam on the basis, per side: float32 ``k × r`` moments and a float32 ``step``."""
        layout = {}
        for side in sides:
            size = (side_size(side, shape), rank)
            layout[f"osd_{side}_exp_avg"] = StateTensor(size, torch.float32)
            layout[f"osd_{side}_exp_avg_sq"] = StateTensor(size, torch.float32)
            layout[f"osd_{side}_step"] = StateTensor((), torch.float32)
        return layout

    def projects_first(self, group):
        return group.get("osd_order", ONLINE_PCA_DEFAULTS["osd_order"]) == "project_then_update"

    def find(self, matrix, rank, side, *, previous, state, group):
        if previous is None or previous.shape[1] != rank:
            basis = top_singular_basis(matrix, rank, side)
            for suffix in ("exp_avg", "exp_avg_sq", "step"):
                state.pop(f"osd_{side}_{suffix}", None)
            return basis
        return self.track(matrix, previous, side, state=state, group=group)

    def track(self, matrix, basis, side, *, state, group):
        alpha = float(group.get("osd_alpha", ONLINE_PCA_DEFAULTS["osd_alpha"]))
        lam = float(group.get("osd_lambda", ONLINE_PCA_DEFAULTS["osd_lambda"]))
        lr = alpha * float(group["lr"])
        a = matrix if side == "left" else matrix.t()
        if not all_finite(a):
            return basis
        _, grad = online_pca_loss_grad(a, basis, lam)
        key = f"osd_{side}"
        if f"{key}_exp_avg" not in state:
            state[f"{key}_exp_avg"] = torch.zeros_like(grad)
            state[f"{key}_exp_avg_sq"] = torch.zeros_like(grad)
            state[f"{key}_step"] = torch.tensor(0.0, dtype=torch.float32)
        return adam_step(
            basis.float(), grad, state[f"{key}_exp_avg"], state[f"{key}_exp_avg_sq"], state[f"{key}_step"], lr=lr
        )


def adam_step(
    p: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float] = OSD_BETAS,
    eps: float = OSD_EPS,
) -> torch.Tensor:
    """One Adam step; moments and ``step`` advanced in place, the new ``p`` returned (``p`` untouched)."""
    beta1, beta2 = betas
    step += 1
    t = float(step)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (exp_avg_sq / (1.0 - beta2**t)).sqrt_().add_(eps)
    return torch.addcdiv(p, exp_avg, denom, value=-lr / (1.0 - beta1**t))


__all__ = ["ONLINE_PCA_DEFAULTS", "OSD_ORDERS", "OnlinePCAFinder", "adam_step", "online_pca_loss_grad", "pca_residual"]
