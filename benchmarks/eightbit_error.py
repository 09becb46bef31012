"""8-bit vs 32-bit Adam: displacement error of projected and full-rank weights, side by side.

For each weight, the displacement after ``--steps`` steps from the same start
is compared between the 8-bit optimizer and its 32-bit counterpart:

    error  = ||Δ8 − Δ32|| / ||Δ32||        cosine = cos(Δ8, Δ32)

* **projected**: ``GaLoreAdamW8bit`` vs ``GaLoreAdamW`` (same groups, rank
  ``--rank``, ``proj_type='std'``, one basis for the whole run);
* **full-rank**: ``bitsandbytes.optim.AdamW8bit`` vs ``torch.optim.AdamW`` on
  the same weights.

Two gradient sources, one run:

1. **synthetic**: a fixed stream of gradients ``G_t = U diag(s·c_t) Vᵀ + noise``
   (orthonormal ``U``, ``V``; ``s`` decaying; ``c_t`` a per-direction,
   per-step factor around 1) for several shapes, including row lengths that
   are not multiples of bitsandbytes' 256-value blocks. The gradients do not
   depend on the weights, so both optimizers see exactly the same ones.
   Spectra: ``decay`` (``s_i = 10^(−3i/k)``, three decades over the first
   ``k = 2·rank`` directions) and ``spiked`` (4 directions 1000× the rest: an
   outlier direction next to a small one, the case block-wise scales that mix
   directions handle worst).
2. **llama**: a small LLaMA (``hidden 512``, ``intermediate 1376`` as the
   GaLore paper's 60M, 2 layers) trained ``--steps`` steps on random tokens;
   attention and MLP weights projected, everything else full-rank in the
   same optimizer; the full-rank comparison trains the whole model.

    python benchmarks/eightbit_error.py                 # ~1 min on one CPU core
    python benchmarks/eightbit_error.py --steps 50 --rank 64 --skip_llama
    python benchmarks/eightbit_error.py --projector auto     # the default basis finder instead of exact SVD
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_llama, environment_line, galore_targets

from hf_galore import GaLoreAdamW, GaLoreAdamW8bit

SHAPES = ((512, 1376), (1376, 512), (768, 300), (1024, 1024), (256, 4000))


def error_and_cosine(moved8: torch.Tensor, moved32: torch.Tensor) -> tuple[float, float]:
    a, b = moved8.double().flatten(), moved32.double().flatten()
    return float((a - b).norm() / b.norm()), float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def gradient_stream(shape, steps: int, rank: int, spectrum: str, seed: int) -> list[torch.Tensor]:
    m, n = shape
    gen = torch.Generator().manual_seed(seed)
    k = min(2 * rank, m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
    if spectrum == "decay":
        s = 10.0 ** (-3.0 * torch.arange(k) / k)
    else:  # spiked
        s = torch.full((k,), 1e-3)
        s[:4] = 1.0
    grads = []
    for _ in range(steps):
        c = 1.0 + 0.3 * torch.randn(k, generator=gen)
        noise = torch.randn(m, n, generator=gen) * (1e-4 / (m * n) ** 0.5)
        grads.append((u * (s * c)) @ v.t() + noise)
    return grads


def projected_stream(grads: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """The low-rank gradients ``R_t`` (one row per direction, rows padded to whole 256-value blocks).

    Fed to ``bitsandbytes.optim.AdamW8bit`` as if ``R`` were a full-rank
    weight, they give 8-bit Adam's own error on exactly the numbers the
    projected optimizer quantizes: what is left once no block mixes directions.
    """
    m, n = grads[0].shape
    u, _, vh = torch.linalg.svd(grads[0].double(), full_matrices=False)
    r = min(rank, m, n)
    if m >= n:  # proj_type="std": right basis, R = G·B, one column per direction
        rows = [(g.double() @ vh[:r].t()).t() for g in grads]
    else:
        rows = [u[:, :r].t() @ g.double() for g in grads]
    length = rows[0].shape[1]
    padded = -(-length // 256) * 256
    return [torch.nn.functional.pad(x.float(), (0, padded - length)) for x in rows]


def run_stream(make_optimizer, start: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    weight = torch.nn.Parameter(start.clone())
    optimizer = make_optimizer(weight)
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    return weight.detach() - start


def synthetic(args, bnb) -> list[dict]:
    rows = []
    lr, steps = args.lr, args.steps
    lowrank = {"rank": args.rank, "update_proj_gap": 10 * steps, "proj_type": "std", "scale": 1.0, "projector": args.projector}
    makers = {
        "galore8": lambda w: GaLoreAdamW8bit([{"params": [w], **lowrank}], lr=lr),
        "galore32": lambda w: GaLoreAdamW([{"params": [w], **lowrank}], lr=lr),
        "bnb8": lambda w: bnb.optim.AdamW8bit([w], lr=lr, weight_decay=0.0),
        "adamw32": lambda w: torch.optim.AdamW([w], lr=lr, weight_decay=0.0),
    }
    for spectrum in ("decay", "spiked"):
        for shape in SHAPES:
            errors: dict[str, list[tuple[float, float]]] = {"projected": [], "full-rank": [], "8-bit Adam on R": []}
            for seed in args.seeds:
                grads = gradient_stream(shape, steps, args.rank, spectrum, seed)
                start = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1000)) * 0.02
                moved = {name: run_stream(make, start, grads) for name, make in makers.items()}
                errors["projected"].append(error_and_cosine(moved["galore8"], moved["galore32"]))
                errors["full-rank"].append(error_and_cosine(moved["bnb8"], moved["adamw32"]))
                rows_stream = projected_stream(grads, args.rank)
                zero = torch.zeros_like(rows_stream[0])
                on_r = {name: run_stream(makers[name], zero, rows_stream) for name in ("bnb8", "adamw32")}
                errors["8-bit Adam on R"].append(error_and_cosine(on_r["bnb8"], on_r["adamw32"]))
            m, n = shape
            low = (min(args.rank, m, n), max(m, n))  # the low-rank moment's layout: one row per direction
            rows.append(
                {
                    "source": f"synthetic {spectrum}",
                    "shape": f"{m}×{n}",
                    "row": f"{low[1]}" + ("" if low[1] % 256 == 0 else " (not ×256)"),
                    **{kind: _mean(values) for kind, values in errors.items()},
                }
            )
    return rows


def llama(args, bnb) -> list[dict]:
    lr, steps = args.lr, args.steps
    rows = []
    for seed in args.seeds:
        gen = torch.Generator().manual_seed(seed)
        batches = [torch.randint(0, args.vocab, (4, 64), generator=gen) for _ in range(steps)]
        moved = {}
        for name in ("galore8", "galore32", "bnb8", "adamw32"):
            model = build_llama(seed=seed, num_hidden_layers=2, vocab_size=args.vocab)
            targets = galore_targets(model)
            ids = {id(p) for p in targets}
            rest = [p for p in model.parameters() if id(p) not in ids]
            lowrank = {"rank": args.rank, "update_proj_gap": 10 * steps, "proj_type": "std", "scale": 1.0, "projector": args.projector}
            if name == "galore8":
                opt = GaLoreAdamW8bit([{"params": rest}, {"params": targets, **lowrank}], lr=lr)
            elif name == "galore32":
                opt = GaLoreAdamW([{"params": rest}, {"params": targets, **lowrank}], lr=lr)
            elif name == "bnb8":
                opt = bnb.optim.AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0)
            else:
                opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
            start = [p.detach().clone() for p in targets]
            for batch in batches:
                model(input_ids=batch, labels=batch).loss.backward()
                opt.step()
                opt.zero_grad()
            moved[name] = [p.detach() - s for p, s in zip(targets, start)]
            shapes = [tuple(p.shape) for p in targets]
        for i, shape in enumerate(shapes):
            m, n = shape
            low = (min(args.rank, m, n), max(m, n))
            rows.append(
                {
                    "source": "llama",
                    "shape": f"{m}×{n}",
                    "row": f"{low[1]}" + ("" if low[1] % 256 == 0 else " (not ×256)"),
                    "projected": error_and_cosine(moved["galore8"][i], moved["galore32"][i]),
                    "full-rank": error_and_cosine(moved["bnb8"][i], moved["adamw32"][i]),
                    "8-bit Adam on R": (float("nan"), float("nan")),
                }
            )
    # one row per shape: the mean over layers, kinds and seeds
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["shape"], []).append(row)
    return [
        {
            "source": "llama",
            "shape": f"{shape} (×{len(group)})",
            "row": group[0]["row"],
            "projected": _mean([r["projected"] for r in group]),
            "full-rank": _mean([r["full-rank"] for r in group]),
            "8-bit Adam on R": (float("nan"), float("nan")),
        }
        for shape, group in grouped.items()
    ]


def _mean(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--skip_llama", action="store_true")
    # exact SVD by default: the "8-bit Adam on R" column projects onto G_0's exact singular vectors, so the
    # optimizer's basis must be the same for the two columns to quantize the same numbers
    parser.add_argument("--projector", default="svd", help="the projected optimizers' basis finder (default: svd)")
    args = parser.parse_args(argv)
    import bitsandbytes as bnb

    torch.set_num_threads(1)
    began = time.perf_counter()
    rows = synthetic(args, bnb)
    if not args.skip_llama:
        rows += llama(args, bnb)
    print(f"{environment_line()}; {time.perf_counter() - began:.0f} s")
    print(f"steps {args.steps}, rank {args.rank}, projector {args.projector}, lr {args.lr}, seeds {args.seeds}; mean over seeds")
    print()
    print(
        "| gradients | shape | low-rank row | projected: error | cos | full-rank: error | cos | ratio "
        "| 8-bit Adam on R: error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        (pe, pc), (fe, fc), (re, _) = row["projected"], row["full-rank"], row["8-bit Adam on R"]
        on_r = "—" if math.isnan(re) else f"{re:.4f}"
        print(
            f"| {row['source']} | {row['shape']} | {row['row']} | {pe:.4f} | {pc:.4f} | {fe:.4f} | {fc:.4f} "
            f"| {pe / fe:.2f} | {on_r} |"
        )
    worst = max(r["projected"][0] / r["full-rank"][0] for r in rows)
    print(f"\nworst projected / full-rank error ratio: {worst:.2f}")
    return rows


if __name__ == "__main__":
    main()
