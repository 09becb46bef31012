"""Randomized range finder / warm-started subspace iteration (Halko, Martinsson & Tropp 2011).

Exact SVD of every gradient at every refresh is the slowest part of GaLore at
scale (galore-torch 1.0, measured: 280 s for the 224 LLaMA-7B weights on an H100). The
top-``r`` singular subspace is all GaLore needs, and it can be found with a few
matrix products instead:

* **cold start** (no previous basis): ``Y = A Ω`` with a Gaussian ``Ω`` of
  ``r + oversample`` columns, then ``power_iters`` rounds of
  ``Q ← orth(A Aᵀ Q)`` (arXiv:0909.4061, Alg. 4.4);
* **warm start** (a previous basis ``P``): subspace iteration started from
  ``[P, A Ω_p]`` (the old basis plus ``oversample`` fresh random directions),
  ``warm_iters`` rounds. Gradient subspaces drift slowly, so one round usually
  recovers the exact basis' captured energy (docs/benchmarks.md);
* both finish with a Rayleigh–Ritz step: the top-``r`` eigenvectors of the
  small ``(r+p) × (r+p)`` matrix ``QᵀA AᵀQ`` rotate ``Q`` so that its first
  ``r`` columns are the best rank-``r`` basis inside ``span(Q)``, sorted.

``A`` is the gradient for the left side and its transpose for the right side.
The random test matrix comes from a generator seeded by the weight's step, the
matrix shape and the group key ``proj_seed``: results are reproducible, resumable
from a checkpoint without any stored RNG state, and identical on all DDP ranks
(whose gradients are already all-reduced). Two weights of the same shape share
``Ω`` at the same step, which is harmless: the range finder's guarantee holds
for each matrix separately over the draw of ``Ω``.
"""

from __future__ import annotations

import torch

from .base import BasisFinder, Side

#: Group keys read here, with their defaults (also in ``LOWRANK_DEFAULTS``).
RANDOMIZED_DEFAULTS = {"oversample": 8, "power_iters": 2, "warm_iters": 1, "proj_seed": 0}


def _orth(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns (reduced QR, float32)."""
    return torch.linalg.qr(matrix, mode="reduced").Q


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (deterministic across processes, unlike ``hash``)."""
    value = 0x9E37_79B9_7F4A_7C15
    for part in parts:
        value ^= (int(part) + 0x9E37_79B9_7F4A_7C15 + (value << 6) + (value >> 2)) & 0xFFFF_FFFF_FFFF_FFFF
    return value & 0x7FFF_FFFF_FFFF_FFFF


def range_basis(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int,
    iters: int,
    seed: int,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Approximate top-``rank`` left singular vectors of ``a`` (``k × n``) as ``(k, rank)`` float32.

    ``start`` (``k × r``, orthonormal) warm-starts the iteration. Pure function
    of its arguments: the same inputs give the same basis bit for bit.
    """
    a = a.float()
    k, n = a.shape
    width = min(rank + max(oversample, 0), k, n)
    gen = _generator(a.device, seed)
    if start is None:
        omega = torch.randn(n, width, generator=gen, device=a.device, dtype=a.dtype)
        q = _orth(a @ omega)
    else:
        extra = width - start.shape[1]
        if extra > 0:
            omega = torch.randn(n, extra, generator=gen, device=a.device, dtype=a.dtype)
            q = _orth(torch.cat([start.float(), a @ omega], dim=1))
        else:
            q = _orth(start.float()[:, :width])  # a dequantized basis is only nearly orthonormal
    for _ in range(iters):
        q = _orth(a @ (a.t() @ q))
    # Rayleigh-Ritz: best rank-r basis inside span(q), columns sorted by energy.
    b = q.t() @ a
    gram = b @ b.t()
    _, vecs = torch.linalg.eigh(gram.double())
    top = vecs[:, -rank:].flip(1).to(q.dtype)
    return (q @ top).contiguous()


class RandomizedFinder(BasisFinder):
    """Randomized range finder, warm-started from the previous basis at every refresh.

    Group keys: ``oversample`` (extra random columns, 8), ``power_iters``
    (rounds for a cold start, 2), ``warm_iters`` (rounds from the previous
    basis, 1), ``proj_seed`` (0).
    """

    name = "randomized"

    def find(self, matrix, rank, side, *, previous, state, group):
        return randomized_basis(matrix, rank, side, previous=previous, step=int(state.get("step", 0)), group=group)


def randomized_basis(
    matrix: torch.Tensor,
    rank: int,
    side: Side,
    *,
    previous: torch.Tensor | None,
    step: int,
    group: dict,
) -> torch.Tensor:
    """The randomized basis of one side, reading its options from ``group`` (defaults above).

    Also the fallback when an exact SVD fails (``lowrank.refresh_basis``).
    """
    opts = {key: group.get(key, default) for key, default in RANDOMIZED_DEFAULTS.items()}
    a = matrix if side == "left" else matrix.t()
    warm = previous is not None and previous.shape == (a.shape[0], rank)
    seed = derive_seed(opts["proj_seed"], step, *matrix.shape, 0 if side == "left" else 1)
    return range_basis(
        a,
        rank,
        oversample=opts["oversample"],
        iters=opts["warm_iters"] if warm else opts["power_iters"],
        seed=seed,
        start=previous if warm else None,
    )
