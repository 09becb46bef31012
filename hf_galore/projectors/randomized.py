"""Randomized range finder / warm-started subspace iteration (Halko, Martinsson & Tropp 2011).

Exact SVD of every gradient at every refresh is the slowest part of GaLore at
scale (galore-torch 1.0, measured: 280 s for the 224 LLaMA-7B weights on an H100). The
top-``r`` singular subspace is all GaLore needs, and it can be found with a few
matrix products instead:

* **cold start** (no previous basis): ``Y = A Ω`` with a Gaussian ``Ω`` of
  ``r + oversample`` columns, then ``power_iters`` rounds of
  ``Q ← orth(A Aᵀ Q)`` (arXiv:0909.4061, Alg. 4.4). One round by default:
  on gradient-like spectra it already captures ≥ 0.9999 of the exact basis'
  energy (4096×11008, r = 1024), and where it does not, the energy guard
  below adds rounds, so a second fixed round would only cost time (a cold
  refresh at that shape: 0.08× an exact SVD with one round, 0.10–0.11× with
  two; docs/benchmarks.md);
* **warm start** (a previous basis ``P``): subspace iteration started from
  ``[P, A Ω_p]`` (the old basis plus ``oversample`` fresh random directions),
  ``warm_iters`` rounds. Gradient subspaces drift slowly, so one round usually
  recovers the exact basis' captured energy (docs/benchmarks.md);
* both finish with a Rayleigh–Ritz step: the top-``r`` eigenvectors of the
  small ``(r+p) × (r+p)`` matrix ``QᵀA AᵀQ`` rotate ``Q`` so that its first
  ``r`` columns are the best rank-``r`` basis inside ``span(Q)``, sorted.

**Energy guard** (group keys ``energy_threshold``, default 0.99, and
``energy_iters``, default 2). On a flat spectrum a few rounds are not enough
(on a 512×1024 Gaussian matrix at r = 64 a one-round cold start captures 0.83 of the
exact basis' energy, a warm start from an unrelated basis 0.76;
``benchmarks/energy_guard.py``). After the
Rayleigh–Ritz step the finder bounds, without an SVD, the energy the exact
top-``r`` basis would capture (:func:`captured_energy_ratio`); when the
found basis' share of that bound is below ``energy_threshold`` it runs
another round (reusing the product the check computed), up to
``energy_iters`` rounds, then falls back to the exact SVD (counted per
weight in ``state["energy_fallbacks"]``, logged as
``galore/energy_fallbacks``). ``energy_threshold=0`` turns the check off.

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

from ..declare import Option, check_fraction, check_non_negative_int
from .base import BasisFinder, Side
from .svd import top_singular_basis

#: Group keys read here (declared once; every low-rank group accepts them).
OPTIONS = (
    Option("oversample", 8, check_non_negative_int, "extra random columns of the sketch"),
    Option("power_iters", 1, check_non_negative_int, "subspace-iteration rounds from a cold start"),
    Option("warm_iters", 1, check_non_negative_int, "rounds from the previous basis"),
    Option("proj_seed", 0, check_non_negative_int, "seed of the random test matrices"),
    Option(
        "energy_threshold",
        0.99,
        check_fraction,
        "accept a basis capturing >= this fraction of the exact SVD's energy (0 = no check)",
    ),
    Option("energy_iters", 2, check_non_negative_int, "extra rounds before falling back to the exact SVD"),
)
RANDOMIZED_DEFAULTS = {option.name: option.default for option in OPTIONS}


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
    return ritz_basis(a, _subspace(a, rank, oversample=oversample, iters=iters, seed=seed, start=start), rank)[0]


def _subspace(
    a: torch.Tensor, rank: int, *, oversample: int, iters: int, seed: int, start: torch.Tensor | None
) -> torch.Tensor:
    """Orthonormal ``k × (r+p)`` range estimate after ``iters`` rounds of subspace iteration."""
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
    return q


def ritz_basis(a: torch.Tensor, q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh–Ritz in ``span(q)``: the best rank-``rank`` basis there, columns sorted by energy.

    Also returns the Ritz values ``θ`` of ``A Aᵀ`` in ``span(q)`` (descending, float64) and
    ``B = qᵀA``, which :func:`captured_energy_ratio` reuses.
    """
    b = q.t() @ a
    vals, vecs = torch.linalg.eigh((b @ b.t()).double())
    top = vecs[:, -rank:].flip(1).to(q.dtype)
    return (q @ top).contiguous(), vals.flip(0).clamp_min(0.0), b


def captured_energy_ratio(
    a: torch.Tensor, q: torch.Tensor, theta: torch.Tensor, b: torch.Tensor, rank: int
) -> tuple[float, torch.Tensor]:
    """Estimated share of the exact top-``rank`` energy that the Ritz basis of ``span(q)`` captures.

    With ``M = A Aᵀ``, ``Q = q`` (``k × w``, ``w ≥ rank``) and Ritz values
    ``θ₁ ≥ … ≥ θ_w``, the found basis captures ``E = θ₁ + … + θ_r``, and the
    exact basis ``E* = λ₁ + … + λ_r ≥ E``. In the basis ``[Q, Q⊥]``, ``M`` is a
    2×2 block matrix whose diagonal blocks hold ``θ`` and the energy left
    outside ``span(Q)``, and whose off-diagonal block has the norm
    ``ε = ‖(I − QQᵀ) M Q‖₂`` (the residual of the Ritz subspace; one product
    ``Z = A Bᵀ = MQ``). If no direction outside ``span(Q)`` carries more than
    ``θ_w`` (what subspace iteration converges to), the quadratic residual
    bound for Hermitian block matrices (C.-K. Li & R.-C. Li, Linear Algebra
    Appl. 395, 2005) gives ``λ_i − θ_i ≤ 2ε²/(η_i + √(η_i² + 4ε²))`` with
    ``η_i = θ_i − θ_w``, so ``Ê = E + Σ_{i≤r} 2ε²/(η_i + √(η_i² + 4ε²)) ≥ E*``
    and ``E/Ê`` is a lower bound of the true ratio ``E/E*``. The assumption is
    not checked (that would need the spectrum outside ``span(Q)``): a start
    far from converged can break it, and a flat spectrum (small gaps ``η``)
    makes the bound pessimistic, which errs towards more rounds or the exact
    SVD. Measured (``tests/projectors/test_randomized.py``): a lower bound of
    the true ratio after one or more rounds on flat and decaying spectra, cold
    and warm from an unrelated basis; on a raw sketch (no round yet) it can
    overshoot, so the finder only trusts it after a round. Returns
    ``(E/Ê, Z)``; ``orth(Z)`` is the next round's subspace.
    """
    z = a @ b.t()
    residual = (z - q @ (b @ b.t())).double()
    eps2 = float(torch.linalg.eigvalsh(residual.t() @ residual)[-1].clamp_min(0.0))
    captured = float(theta[:rank].sum())
    eta = theta[:rank] - theta[-1]
    missing = float((2.0 * eps2 / (eta + torch.sqrt(eta * eta + 4.0 * eps2)).clamp_min(1e-300)).sum())
    total = captured + missing
    return (captured / total if total > 0 else 1.0), z


class RandomizedFinder(BasisFinder):
    """Randomized range finder, warm-started from the previous basis at every refresh.

    Group keys: ``oversample`` (extra random columns, 8), ``power_iters``
    (rounds for a cold start, 1; the energy guard adds rounds where one is not enough), ``warm_iters`` (rounds from the previous
    basis, 1), ``proj_seed`` (0), ``energy_threshold`` (0.99) and
    ``energy_iters`` (2) for the energy guard.
    """

    name = "randomized"
    options = OPTIONS

    def refresh_transient_bytes(self, side, other, rank, group):
        """The larger of two phases, ``A`` being ``k × n`` (``k = side``) and ``w = rank + oversample``.

        The subspace iteration holds the cold sketch ``Ω`` and ``AᵀQ`` (``n × w`` each), ``Q`` and
        ``A(AᵀQ)`` (``k × w``); the energy check holds ``B = QᵀA`` (``w × n``), ``Q``, ``Z = ABᵀ``,
        the residual ``Z − Q(BBᵀ)`` and its float64 copy (``k × w``, five in all in float32 words)
        and the Ritz basis (``k × rank``). The ``w × w`` products are smaller than either. Measured
        (``benchmarks/step_transient.py``, bf16, LLaMA-7B shapes): the energy check is the peak, and
        this is within 0.1 MiB of it. The float32 gradient and previous basis are the caller's.
        """
        w = min(rank + int(group.get("oversample", RANDOMIZED_DEFAULTS["oversample"])), side, other)
        subspace = 2 * other * w + 2 * side * w
        energy = other * w + 5 * side * w + side * rank
        return 4 * max(subspace, energy)

    def find(self, matrix, rank, side, *, previous, state, group):
        basis, exact = guarded_randomized_basis(
            matrix, rank, side, previous=previous, step=int(state.get("step", 0)), group=group
        )
        if exact:
            state["energy_fallbacks"] = int(state.get("energy_fallbacks", 0)) + 1
        return basis


def randomized_basis(
    matrix: torch.Tensor,
    rank: int,
    side: Side,
    *,
    previous: torch.Tensor | None,
    step: int,
    group: dict,
) -> torch.Tensor:
    """The randomized basis of one side, reading its options from ``group`` (defaults above), unguarded.

    The fallback when an exact SVD fails (``lowrank.refresh_basis``): it must
    not fall back to the SVD in turn, so the energy guard is off here.
    """
    return guarded_randomized_basis(
        matrix, rank, side, previous=previous, step=step, group={**group, "energy_threshold": 0.0}
    )[0]


def guarded_randomized_basis(
    matrix: torch.Tensor,
    rank: int,
    side: Side,
    *,
    previous: torch.Tensor | None,
    step: int,
    group: dict,
) -> tuple[torch.Tensor, bool]:
    """The randomized basis with the energy guard; the flag is True when it fell back to the exact SVD."""
    opts = {key: group.get(key, default) for key, default in RANDOMIZED_DEFAULTS.items()}
    a = (matrix if side == "left" else matrix.t()).float()
    warm = previous is not None and previous.shape == (a.shape[0], rank)
    seed = derive_seed(opts["proj_seed"], step, *matrix.shape, 0 if side == "left" else 1)
    q = _subspace(
        a,
        rank,
        oversample=opts["oversample"],
        iters=opts["warm_iters"] if warm else opts["power_iters"],
        seed=seed,
        start=previous if warm else None,
    )
    basis, theta, b = ritz_basis(a, q, rank)
    threshold = float(opts["energy_threshold"])
    if threshold <= 0.0:
        return basis, False
    budget = int(opts["energy_iters"])
    rounds = opts["warm_iters"] if warm else opts["power_iters"]
    for extra in range(budget + 1):
        # before any round, span(Q) is a raw sketch and the estimate's assumption often fails
        # (measured: it overshoots the true ratio), so it is trusted only after a round
        if rounds > 0:
            ratio, z = captured_energy_ratio(a, q, theta, b, rank)
            if ratio >= threshold:
                return basis, False
        else:
            z = a @ b.t()
        if extra < budget:
            q = _orth(z)  # one more subspace-iteration round, reusing Z = A Aᵀ Q
            # drop the last round's B = QᵀA and basis before the next Ritz step makes its own: holding
            # both would double the largest term of the declared working set (refresh_transient_bytes)
            z = basis = b = None
            basis, theta, b = ritz_basis(a, q, rank)
            rounds += 1
    return top_singular_basis(matrix, rank, side), True
