"""Randomized projector with and without the energy guard, on flat and decaying spectra.

For each spectrum and start, prints the captured energy ``‖PᵀG‖²`` as a
fraction of the exact SVD's, for the randomized finder without the guard
(``energy_threshold=0``) and with it (defaults: 0.99, 2 extra rounds, then
exact SVD), whether the guard fell back to the SVD, and the times.

* ``flat``: a Gaussian matrix (Marchenko–Pastur spectrum);
* ``power-law``: ``benchmarks/refresh.py``'s gradient-like matrix (σᵢ ∝ 1/i plus a noise floor);
* starts: ``cold`` (no previous basis, ``power_iters`` rounds: 1 by default), ``warm`` (the exact basis of a
  drifted previous gradient, 1 round) and ``unrelated`` (a random orthonormal basis, 1 round).

    python benchmarks/energy_guard.py                       # 512x1024, rank 64: ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from hf_galore.projectors import get_projector
from hf_galore.projectors.svd import top_singular_basis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refresh import synthetic_gradient


def _energy(g: torch.Tensor, basis: torch.Tensor) -> float:
    return float((basis.t() @ g).square().sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512x1024")
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args(argv)
    m, n = (int(v) for v in args.shape.split("x"))
    torch.set_num_threads(1)
    finder = get_projector("randomized")
    gen = torch.Generator().manual_seed(0)
    spectra = {
        "flat": (torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen)),
        "power-law": (synthetic_gradient(m, n, 1), synthetic_gradient(m, n, 2)),
    }
    print(f"shape {m}x{n}, rank {args.rank}, left side")
    print("| spectrum | start | unguarded energy | guarded energy | SVD fallback | unguarded s | guarded s | exact SVD s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (g, other) in spectra.items():
        started = time.perf_counter()
        exact = top_singular_basis(g, args.rank, "left")
        exact_s = time.perf_counter() - started
        best = _energy(g, exact)
        drifted = top_singular_basis(g + 0.3 * other * float(g.norm() / other.norm()), args.rank, "left")
        unrelated = torch.linalg.qr(torch.randn(m, args.rank, generator=gen)).Q
        for start, previous in (("cold", None), ("warm", drifted), ("unrelated", unrelated)):
            out = []
            for group in ({"energy_threshold": 0.0}, {}):
                state: dict = {"step": 3}
                started = time.perf_counter()
                basis = finder.find(g, args.rank, "left", previous=previous, state=state, group=group)
                out.append((_energy(g, basis) / best, time.perf_counter() - started, "energy_fallbacks" in state))
            (e0, t0, _), (e1, t1, fell) = out
            row = f"| {name} | {start} | {e0:.4f} | {e1:.4f} | {'yes' if fell else 'no'} | {t0:.3f} | {t1:.3f} | {exact_s:.3f} |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
