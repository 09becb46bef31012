"""Basis refresh: time and captured energy of each projector against exact SVD.

For each shape ``m×n`` and rank ``r`` this times one refresh of the basis on
the smaller side (GaLore's ``proj_type="std"``) and reports the captured
energy ``‖PᵀG‖²/‖G‖²`` as a fraction of the exact SVD's:

* ``exact``: ``torch.linalg.svd(G, full_matrices=False)`` (galore-torch's refresh);
* ``svd_lowrank``: ``torch.svd_lowrank(G, q=r+8, niter=2)``;
* ``randomized cold``: ``projector="randomized"`` with no previous basis
  (range finder, ``power_iters`` rounds (default 1), oversampling 8);
* ``randomized warm``: the same finder warm-started from the previous
  refresh's exact basis, one subspace-iteration round (what every refresh
  after the first does);
* ``auto cold`` / ``auto warm``: the default projector (``projector="auto"``
  with every default group key: exact SVD below its size switch, the
  randomized finder *with its energy guard* above it), first basis and a
  warm refresh. ``auto-guard fallbacks`` counts its falls back to the SVD.

``--crossover`` instead times the exact SVD against the guarded randomized
finder (warm and cold) over a grid of shapes and ``r/min(m, n)``, with the
rule ``projector="auto"`` applies to each cell: where the two cross is what
``auto_min_numel`` / ``auto_max_rank_ratio`` are set from.

Gradients are synthetic but gradient-like: a power-law spectrum
(``σᵢ ∝ 1/(i+1)``) on ``min(m,n)/2`` directions plus a noise floor, and the
"current" gradient is the previous one plus ``--drift`` times an independent
draw (the overlap of their exact bases is printed, so the regime is visible).

    python benchmarks/refresh.py                                  # small default (minutes on 2 cores)
    python benchmarks/refresh.py --shapes 4096x11008 --ranks 128,512,1024
    python benchmarks/refresh.py --llama60m --ranks 128          # real gradients, 56 weights
    python benchmarks/refresh.py --shapes 4096x11008 --ranks 1024 --skip-lowrank --previous randomized
    python benchmarks/refresh.py --crossover                     # where auto switches (minutes)

Prints a markdown table. Timings on a shared CPU are noisy; compare within a
row (all methods run back to back on the same matrix).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from hf_galore.optim.validation import LOWRANK_DEFAULTS
from hf_galore.projectors import get_projector
from hf_galore.projectors.auto import auto_uses_randomized
from hf_galore.projectors.geometry import subspace_overlap
from hf_galore.projectors.randomized import guarded_randomized_basis, randomized_basis
from hf_galore.projectors.svd import top_singular_basis


def synthetic_gradient(m: int, n: int, seed: int, noise: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = max(min(m, n) // 2, 1)
    spectrum = 1.0 / torch.arange(1, q + 1, dtype=torch.float32)
    left = torch.randn(m, q, generator=g) / m**0.5
    right = torch.randn(q, n, generator=g) / n**0.5
    signal = (left * spectrum) @ right
    floor = torch.randn(m, n, generator=g) * (noise * float(signal.norm()) / (m * n) ** 0.5)
    return signal + floor


def captured(g: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    projected = basis.t() @ g if side == "left" else g @ basis
    return float(projected.square().sum() / g.square().sum())


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def exact_bases(g: torch.Tensor, side: str, ranks: list[int]) -> tuple[dict[int, torch.Tensor], float]:
    (u, _, vh), seconds = timed(torch.linalg.svd, g, full_matrices=False)
    full = u if side == "left" else vh.t()
    return {r: full[:, :r].contiguous() for r in ranks}, seconds


def svd_lowrank_basis(g: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    torch.manual_seed(0)
    u, _, v = torch.svd_lowrank(g, q=rank + 8, niter=2)
    return (u if side == "left" else v)[:, :rank]


def auto_basis(g: torch.Tensor, rank: int, side: str, previous: torch.Tensor | None, step: int) -> torch.Tensor:
    """One refresh by the default projector with every default group key (the energy guard included)."""
    state = {"step": step, "energy_fallbacks": 0}
    basis = get_projector("auto").find(g, rank, side, previous=previous, state=state, group=dict(LOWRANK_DEFAULTS))
    auto_basis.fallbacks += state["energy_fallbacks"]
    return basis


auto_basis.fallbacks = 0


def llama_gradients(steps_between: int, batch: int, seq: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of LLaMA-60M's 56 attention/MLP weights at two points ``steps_between`` AdamW steps apart.

    Random init (seed 0), byte-level tokens of CPython's ``argparse`` source.
    """
    import argparse as text_source
    import inspect

    from _common import build_llama, galore_targets

    data = torch.tensor(list(inspect.getsource(text_source).encode()), dtype=torch.long)
    model = build_llama(seed=0)
    targets = galore_targets(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def grads(step: int) -> list[torch.Tensor]:
        start = (step * batch * seq) % (data.numel() - batch * seq - 1)
        ids = data[start : start + batch * seq].view(batch, seq)
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [w.grad.detach().clone() for w in targets]

    before = grads(0)
    for step in range(steps_between):
        grads(step + 1)
        optimizer.step()
    return before, grads(steps_between + 1)


def llama_table(args: argparse.Namespace, ranks: list[int]) -> None:
    """All 56 LLaMA-60M targets, real gradients: total refresh seconds and energy per method."""
    before, after = llama_gradients(args.steps_between, batch=4, seq=128)
    print(f"LLaMA-60M, 56 weights, real gradients {args.steps_between} AdamW steps apart, threads {args.threads}")
    print("| rank | exact SVD s | randomized cold s (× faster) | randomized warm s (× faster) "
          "| cold energy min / mean | warm energy min / mean | old/new overlap mean "
          "| auto (default) cold s (cost / SVD) | auto warm s (cost / SVD) | auto cold energy min / mean "
          "| auto warm energy min / mean | auto: weights on randomized, guard fallbacks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ranks:
        totals = {"exact": 0.0, "cold": 0.0, "warm": 0.0, "auto cold": 0.0, "auto warm": 0.0}
        ratios: dict[str, list[float]] = {"cold": [], "warm": [], "auto cold": [], "auto warm": []}
        auto_basis.fallbacks = 0
        switched = 0
        overlaps = []
        for g0, g1 in zip(before, after):
            side = "left" if g1.shape[0] < g1.shape[1] else "right"
            old, _ = exact_bases(g0, side, [r])
            exact, seconds = exact_bases(g1, side, [r])
            totals["exact"] += seconds
            exact_e = captured(g1, exact[r], side)
            overlaps.append(subspace_overlap(old[r], exact[r]))
            cold, seconds = timed(randomized_basis, g1, r, side, previous=None, step=0, group={})
            totals["cold"] += seconds
            warm, seconds = timed(randomized_basis, g1, r, side, previous=old[r], step=1, group={})
            totals["warm"] += seconds
            ratios["cold"].append(captured(g1, cold, side) / exact_e)
            ratios["warm"].append(captured(g1, warm, side) / exact_e)
            auto_cold, seconds = timed(auto_basis, g1, r, side, None, 0)
            totals["auto cold"] += seconds
            auto_warm, seconds = timed(auto_basis, g1, r, side, old[r], 1)
            totals["auto warm"] += seconds
            ratios["auto cold"].append(captured(g1, auto_cold, side) / exact_e)
            ratios["auto warm"].append(captured(g1, auto_warm, side) / exact_e)
            switched += auto_uses_randomized(g1.shape, r, LOWRANK_DEFAULTS)
        ex = totals["exact"]
        n = len(after)
        print(
            f"| {r} | {ex:.2f} | {totals['cold']:.2f} ({ex / totals['cold']:.1f}×) | "
            f"{totals['warm']:.2f} ({ex / totals['warm']:.1f}×) | "
            f"{min(ratios['cold']):.4f} / {sum(ratios['cold']) / 56:.4f} | "
            f"{min(ratios['warm']):.4f} / {sum(ratios['warm']) / 56:.4f} | {sum(overlaps) / 56:.3f} | "
            f"{totals['auto cold']:.2f} ({totals['auto cold'] / ex:.3f}) | "
            f"{totals['auto warm']:.2f} ({totals['auto warm'] / ex:.3f}) | "
            f"{min(ratios['auto cold']):.4f} / {sum(ratios['auto cold']) / n:.4f} | "
            f"{min(ratios['auto warm']):.4f} / {sum(ratios['auto warm']) / n:.4f} | "
            f"{switched} of {n}, {auto_basis.fallbacks} |"
        )


CROSSOVER_SHAPES = "128x128,128x352,192x192,256x256,256x688,512x512,512x1376,1024x2752"
CROSSOVER_RATIOS = (0.125, 0.25, 0.5, 0.625, 0.75)


def median_time(reps: int, fn, *args, **kwargs) -> tuple[object, float]:
    """Result of the last call and the median seconds of ``reps`` calls (a shared CPU has outliers)."""
    seconds = []
    for _ in range(reps):
        out, s = timed(fn, *args, **kwargs)
        seconds.append(s)
    seconds.sort()
    return out, seconds[len(seconds) // 2]


def crossover_table(shapes: list[tuple[int, int]], args: argparse.Namespace) -> None:
    """Exact SVD against the guarded randomized finder over shapes × r/min(m, n), with auto's choice."""
    print(f"crossover: median of {args.reps} calls, drift {args.drift}, threads {args.threads}, "
          f"torch {torch.__version__}, fp32 CPU; power-law synthetic gradients; "
          f"auto_min_numel {LOWRANK_DEFAULTS['auto_min_numel']}, "
          f"auto_max_rank_ratio {LOWRANK_DEFAULTS['auto_max_rank_ratio']}")
    print("| shape | m·n | r | r/min | exact SVD s | guarded randomized warm s (SVD / it) "
          "| guarded randomized cold s (SVD / it) | faster (warm) | auto picks |")
    print("|---|---|---|---|---|---|---|---|---|")
    group = dict(LOWRANK_DEFAULTS)
    for m, n in shapes:
        side = "left" if m <= n else "right"
        previous = synthetic_gradient(m, n, seed=0)
        change = synthetic_gradient(m, n, seed=1)
        current = previous + args.drift * (previous.norm() / change.norm()) * change
        k = min(m, n)
        for ratio in CROSSOVER_RATIOS:
            r = int(k * ratio)
            start = randomized_basis(previous, r, side, previous=None, step=0, group={})
            # interleaved (SVD, warm, cold, SVD, ...): a burst of load on the shared CPU hits all three alike
            seconds: dict[str, list[float]] = {"svd": [], "warm": [], "cold": []}
            for _ in range(args.reps):
                seconds["svd"].append(timed(top_singular_basis, current, r, side)[1])
                seconds["warm"].append(
                    timed(guarded_randomized_basis, current, r, side, previous=start, step=1, group=group)[1]
                )
                seconds["cold"].append(
                    timed(guarded_randomized_basis, current, r, side, previous=None, step=0, group=group)[1]
                )
            svd_s, warm_s, cold_s = (statistics.median(seconds[key]) for key in ("svd", "warm", "cold"))
            pick = "randomized" if auto_uses_randomized((m, n), r, group) else "svd"
            faster = "randomized" if warm_s < svd_s else "svd"
            print(f"| {m}×{n} | {m * n} | {r} | {ratio:.3f} | {svd_s:.4f} | {warm_s:.4f} ({svd_s / warm_s:.2f}×) "
                  f"| {cold_s:.4f} ({svd_s / cold_s:.2f}×) | {faster} | {pick} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=None, help="comma-separated m x n (LLaMA: 4096x11008)")
    parser.add_argument("--ranks", default="128,256", help="comma-separated ranks")
    parser.add_argument("--drift", type=float, default=0.3, help="relative size of the change between refreshes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--skip-lowrank", action="store_true", help="do not time torch.svd_lowrank")
    parser.add_argument("--previous", choices=("exact", "randomized"), default="exact",
                        help="how the previous refresh's basis (the warm start) is computed")
    parser.add_argument("--crossover", action="store_true",
                        help=f"exact SVD vs the guarded randomized finder over shapes x r/min "
                             f"(--shapes default {CROSSOVER_SHAPES})")
    parser.add_argument("--reps", type=int, default=None,
                        help="calls per timing, median taken (default 5 with --crossover; else 1, and the "
                             "exact SVD of the table is always timed once)")
    parser.add_argument("--llama60m", action="store_true", help="real gradients of LLaMA-60M's 56 targets instead")
    parser.add_argument("--steps-between", type=int, default=10, help="--llama60m: AdamW steps between refreshes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.shapes is None:
        args.shapes = CROSSOVER_SHAPES if args.crossover else "512x1376,1024x2752"
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.llama60m:
        llama_table(args, ranks)
        return

    # first calls pay one-off costs (LAPACK workspace, thread pool): warm every path up
    warm = synthetic_gradient(64, 96, seed=2)
    exact_bases(warm, "left", [8])
    svd_lowrank_basis(warm, 8, "left")
    randomized_basis(warm, 8, "left", previous=None, step=0, group={})
    guarded_randomized_basis(warm, 8, "left", previous=None, step=0, group=dict(LOWRANK_DEFAULTS))
    auto_basis(warm, 8, "left", None, 0)
    if args.crossover:
        args.reps = args.reps or 5
        crossover_table(shapes, args)
        return

    rows = []
    reps = args.reps or 1  # the exact SVD is timed once (minutes at 4096×11008); the others take the median
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        tqdm = None
    todo = [(m, n) for m, n in shapes]
    progress = tqdm(total=len(todo) * (1 + len(ranks)), file=sys.stderr) if tqdm else None
    for m, n in todo:
        side = "left" if m < n else "right"
        previous = synthetic_gradient(m, n, seed=0)
        change = synthetic_gradient(m, n, seed=1)
        current = previous + args.drift * (previous.norm() / change.norm()) * change
        usable = [r for r in ranks if r < min(m, n)]
        if args.previous == "exact":
            prev_bases, _ = exact_bases(previous, side, usable)
        else:  # what a run with projector="randomized" holds, at half the exact SVDs of this script
            prev_bases = {r: randomized_basis(previous, r, side, previous=None, step=0, group={}) for r in usable}
        bases, exact_s = exact_bases(current, side, usable)
        if progress:
            progress.update(1)
        for r in usable:
            exact_e = captured(current, bases[r], side)
            overlap = subspace_overlap(prev_bases[r], bases[r])
            methods = {}
            if not args.skip_lowrank:
                methods["svd_lowrank niter 2"] = median_time(reps, svd_lowrank_basis, current, r, side)
            methods["randomized cold"] = median_time(
                reps, randomized_basis, current, r, side, previous=None, step=0, group={}
            )
            methods["randomized warm"] = median_time(
                reps, randomized_basis, current, r, side, previous=prev_bases[r], step=1, group={}
            )
            auto_basis.fallbacks = 0
            methods["auto cold"] = median_time(reps, auto_basis, current, r, side, None, 0)
            methods["auto warm"] = median_time(reps, auto_basis, current, r, side, prev_bases[r], 1)
            row_fallbacks = auto_basis.fallbacks // reps  # per refresh (every call sees the same matrix)
            row = {"shape": f"{m}×{n}", "rank": r, "overlap": overlap, "exact_s": exact_s, "exact_e": exact_e,
                   "auto": ("randomized" if auto_uses_randomized((m, n), r, LOWRANK_DEFAULTS) else "svd"),
                   "fallbacks": row_fallbacks}
            for name, (basis, seconds) in methods.items():
                row[name] = (seconds, captured(current, basis, side) / exact_e)
            rows.append(row)
            if progress:
                progress.update(1)
    if progress:
        progress.close()

    fixed = ("shape", "rank", "overlap", "exact_s", "exact_e", "auto", "fallbacks")
    names = [k for k in rows[0] if k not in fixed] if rows else []
    header = "| shape | rank | old/new overlap | exact SVD s | " + " | ".join(
        f"{n} s (× faster, energy)" for n in names
    ) + " | auto picks | auto-guard fallbacks | auto warm cost / SVD | auto warm energy / SVD's |"
    print(f"drift {args.drift}, previous basis {args.previous}, threads {args.threads}, median of {reps} calls "
          f"(exact SVD: one call), "
          f"torch {torch.__version__}, fp32 CPU")
    print(header)
    print("|" + "---|" * (8 + len(names)))
    for row in rows:
        cells = [
            f"{row[n][0]:.3f} ({row['exact_s'] / row[n][0]:.1f}×, {row[n][1]:.4f})" for n in names
        ]
        cells += [row["auto"], str(row["fallbacks"]), f"{row['auto warm'][0] / row['exact_s']:.4f}",
                  f"{row['auto warm'][1]:.4f}"]
        print(f"| {row['shape']} | {row['rank']} | {row['overlap']:.3f} | {row['exact_s']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
