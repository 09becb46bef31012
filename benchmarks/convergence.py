"""Convergence of every pretraining method on the offline corpus, with a learning-rate sweep per method.

A comparison of optimizers is only fair when each one runs at its own best
learning rate: the paper picked each method's lr from {0.01, 0.005, 0.001,
0.0005, 0.0001} (GaLore, arXiv:2403.03507, §5.1). ``--sweep`` does the same
here, on a small LLaMA and the offline corpus of ``examples/c4_pretrain``:

* **lr grid**: every method's paper lr times ``--lr_factors`` (default
  1/4, 1/2, 1, 2, 4: five values spanning 16×). When the best lr lies on an
  edge of the grid the grid is extended past that edge (``--max_extend``), so
  a winner is never an artefact of where the grid stopped.
* **one per-group rule for everyone**: GaLore-family methods move their
  projected weights at ``scale × lr`` (α = 0.25) and the rest at ``lr``. The
  full-rank and LoRA baselines are run both ways: "uniform" (every parameter at
  ``lr``) and "split" (attention/MLP weights, or their adapters, at 0.25 × lr),
  and keep the better. The baselines thus get twice GaLore's tuning budget:
  a verdict in GaLore's favour is conservative.
* **seeds**: the best configuration of each method is rerun with
  ``--seeds`` seeds (model init and data order); the table reports mean ± std.
* **verdicts** are computed statements, e.g. "within +1.20% (parity: |gap| ≤ 3%)",
  "ahead by 5.10%", "behind by 8.00%", each with the seed noise; a bar reads
  "met" only when the measured number is inside it.
* **stability**: whether the ranking of the methods is the same at the last
  two evaluations (if not, the run is too short to rank them).

Every run is written to ``--results_dir/<method>-<variant>-lr<lr>-seed<s>.json``
as it finishes, and existing files are read instead of trained again: an
interrupted sweep picks up where it stopped.

    python benchmarks/convergence.py --sweep                      # the table and docs/img/convergence_sweep.png
    python benchmarks/convergence.py --sweep --methods adamw galore --steps 200    # a quicker look
    python benchmarks/convergence.py --methods adamw galore --steps 40            # one run per method, paper lr

Without ``--sweep`` each method runs once at its paper lr (the quick look;
its verdicts say so).

``--paired METHOD REFERENCE --paired_lr LR`` trains two methods at one lr
(e.g. the sweep's best GaLore lr) over ``--seeds`` seeds with the sweep's
setup, and states whether their gap is within the paired seed noise; e.g. the
default projector with its size switch forced low against exact SVD, on a
model whose weights are all below the default switch:

    python benchmarks/convergence.py --paired galore_auto_switched galore_svd --paired_lr 0.005 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "c4_pretrain"))

from pretrain_methods import METHODS
from run_pretrain import PretrainArguments, train

from hf_galore.errors import UnsupportedSetupError

#: The layer-wise variants are left out by default: they compute exactly the regular methods'
#: updates (tests/examples/test_pretrain.py checks the losses agree), so they only add time.
DEFAULT_METHODS = ["adamw", "adamw8bit", "galore", "galore_8bit", "online_pca", "q_galore", "lora"]
#: Methods whose projected weights already move at ``galore_scale × lr``: only the split rule applies.
GALORE_FAMILY = {m for m in METHODS if m.startswith(("galore", "online_pca", "q_galore"))}
#: GaLore's scale α (paper §5.1): the lr ratio of projected to other weights under the split rule.
SPLIT_RATIO = 0.25
#: |gap| at or below this is parity (the paper's 60M GaLore-vs-full gap is 2.4%).
PARITY_PCT = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS), metavar="METHOD",
                        help=f"methods to compare (default: %(default)s); choices: {sorted(METHODS)}")
    parser.add_argument("--paired", nargs=2, default=None, choices=sorted(METHODS), metavar=("METHOD", "REFERENCE"),
                        help="train METHOD and REFERENCE at --paired_lr over --seeds seeds (sweep setup, split "
                             "rule, resumable) and compare them against the paired seed noise")
    parser.add_argument("--paired_lr", type=float, default=None, help="--paired: the learning rate of both")
    parser.add_argument("--sweep", action="store_true",
                        help="learning-rate sweep per method, seeds at the best lr, computed verdicts")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run (default: 1000 with --sweep, else 200)")
    parser.add_argument("--model_config", default=None,
                        help="configs/ name or path (default: llama_micro with --sweep, else llama_20m)")
    parser.add_argument("--max_length", type=int, default=None,
                        help="tokens per sequence (default: 64 with --sweep, else 128)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="sequences per step (default: 4 with --sweep, else 8)")
    parser.add_argument("--rank", type=int, default=None, help="GaLore / LoRA rank (default: hidden/4)")
    parser.add_argument("--update_proj_gap", type=int, default=50,
                        help="T; the paper's 200 over 10K steps is 50 refreshes, 50 here gives steps/50 "
                             "(default: %(default)s)")
    parser.add_argument("--eval_every", type=int, default=None,
                        help="steps between evaluations (default: steps/10)")
    parser.add_argument("--eval_tokens", type=int, default=None,
                        help="held-out tokens per evaluation, the same for every method "
                             "(default: 8192 with --sweep, else 16384)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the single runs / the sweep's first seed")
    parser.add_argument("--seeds", type=int, default=2, help="--sweep: seeds at each method's best lr (default: 2)")
    parser.add_argument("--lr_factors", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0],
                        help="--sweep: multiples of each method's paper lr (default: %(default)s)")
    parser.add_argument("--max_extend", type=int, default=2,
                        help="--sweep: grid points added past an edge that holds the best lr (default: 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is fastest on a shared machine, where 2 threads oversubscribe "
                             "the cores (default: %(default)s)")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="single runs: override a method's paper lr, e.g. --lr adamw=2e-3 (repeatable)")
    parser.add_argument("--results_dir", default=None,
                        help="per-run JSON (default: runs/convergence_sweep with --sweep, else runs/convergence)")
    parser.add_argument("--plot", default=None,
                        help="PNG (default: docs/img/convergence_sweep.png with --sweep, else runs/convergence/convergence.png)")
    parser.add_argument("--report_only", action="store_true",
                        help="--sweep: report the runs already stored, train nothing (a partial sweep says so)")
    parser.add_argument("--reuse", action="store_true",
                        help="single runs: read existing per-method JSON instead of training (--sweep always does)")
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=PATH",
                        help="single runs: add a saved result under LABEL to the table and plot (repeatable)")
    args = parser.parse_args(argv)
    sweep_defaults = {"steps": 1000, "model_config": "llama_micro", "max_length": 64, "batch_size": 4, "eval_tokens": 8192,
                      "results_dir": "runs/convergence_sweep", "plot": "docs/img/convergence_sweep.png"}
    single_defaults = {"steps": 200, "model_config": "llama_20m", "max_length": 128, "batch_size": 8, "eval_tokens": 16384,
                       "results_dir": "runs/convergence", "plot": "runs/convergence/convergence.png"}
    if args.paired:
        if args.paired_lr is None or args.paired_lr <= 0:
            parser.error(f"--paired needs a positive --paired_lr, got {args.paired_lr}")
        sweep_defaults = {**sweep_defaults, "results_dir": "runs/convergence_paired", "plot": ""}
    for key, value in (sweep_defaults if args.sweep or args.paired else single_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 10)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if len(args.lr_factors) < 2 or any(f <= 0 for f in args.lr_factors):
        parser.error(f"--lr_factors needs at least two positive values, got {args.lr_factors}")
    return args


# ----------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunSpec:
    """One training run of the sweep."""

    method: str
    variant: str  # "uniform" | "split"
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}-{self.variant}-lr{self.lr:.6g}-seed{self.seed}"

    @property
    def config(self) -> str:
        """The configuration without the seed: what the sweep ranks."""
        return f"{self.method}/{self.variant}"


def variants_of(method: str) -> tuple[str, ...]:
    return ("split",) if method in GALORE_FAMILY else ("uniform", "split")


def run_once(spec: RunSpec, args: argparse.Namespace) -> dict:
    ratio = SPLIT_RATIO if spec.variant == "split" and spec.method not in GALORE_FAMILY else 1.0
    pargs = PretrainArguments(
        method=spec.method,
        model_config=args.model_config,
        learning_rate=spec.lr,
        target_lr_ratio=ratio,
        rank=args.rank,
        update_proj_gap=args.update_proj_gap,
        num_training_steps=args.steps,
        max_length=args.max_length,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        seed=spec.seed,
        output_dir=str(Path(args.results_dir) / "runs" / spec.key),
        log_every=max(1, args.steps // 20),
        save_every=0,
        progress=False,
        export_model=False,  # the sweep compares perplexities; no need for dozens of saved models
    )
    result = train(pargs)
    result.pop("train_losses", None)  # per-step losses: large, and the eval history is what is compared
    result.update({"variant": spec.variant, "seed": spec.seed, "target_lr_ratio": ratio})
    return result


class SweepStore:
    """Per-run JSON files: read when present, written as each run finishes (resumable)."""

    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        self.directory = directory
        self.args = args
        self.train = not args.report_only
        self.unavailable: dict[str, str] = {}
        self.missing: dict[str, int] = {}  # --report_only: runs of a method not stored yet
        self.trained = 0

    def get(self, spec: RunSpec, progress) -> dict | None:
        path = self.directory / f"{spec.key}.json"
        if path.exists():
            return json.loads(path.read_text())
        if spec.method in self.unavailable:
            return None
        if not self.train:
            self.missing[spec.method] = self.missing.get(spec.method, 0) + 1
            return None
        progress.set_description(spec.key)
        started = time.perf_counter()
        try:
            result = run_once(spec, self.args)
        except UnsupportedSetupError as exc:  # e.g. bitsandbytes or peft not installed
            self.unavailable[spec.method] = str(exc)
            return None
        self.trained += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)  # never a half-written result on interruption
        progress.write(f"{spec.key}: ppl {result['eval_ppl']:.2f} ({time.perf_counter() - started:.0f} s)")
        return result


def grid_lr(method: str, factor: float) -> float:
    """``factor`` × the method's paper lr, rounded so that file names and lookups agree."""
    return float(f"{METHODS[method].lr * factor:.6g}")


def sweep_config(method: str, variant: str, args, store: SweepStore, progress) -> dict[float, dict]:
    """Seed-0 results over the lr grid, extended past an edge that holds the best lr."""
    factors = sorted(args.lr_factors)
    spacing = factors[1] / factors[0]  # the grid's step, used to extend it
    results: dict[float, dict] = {}
    pending, extended = factors, 0
    while pending:
        for factor in pending:
            lr = grid_lr(method, factor)
            if lr in results:
                continue
            r = store.get(RunSpec(method, variant, lr, args.seed), progress)
            progress.update(1)
            if r is None:
                if store.train:  # the method cannot run here
                    return results
                continue  # --report_only: not stored yet
            results[lr] = r
        pending = []
        lrs = sorted(results)
        if not lrs:
            return results
        best = min(lrs, key=lambda lr: results[lr]["eval_ppl"])
        if extended < args.max_extend and best in (lrs[0], lrs[-1]):
            edge = lrs[0] / spacing if best == lrs[0] else lrs[-1] * spacing
            pending = [edge / METHODS[method].lr]
            extended += 1
            progress.total += 1
    return results


def run_sweep(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    store = SweepStore(Path(args.results_dir), args)
    planned = sum(len(variants_of(m)) * len(args.lr_factors) + args.seeds - 1 for m in args.methods)
    summary: dict[str, dict] = {}
    with tqdm(total=planned, desc="sweep", unit="run", dynamic_ncols=True) as progress:
        for method in args.methods:
            grid: dict[str, dict[float, dict]] = {}
            for variant in variants_of(method):
                grid[variant] = sweep_config(method, variant, args, store, progress)
            if method in store.unavailable or not any(grid.values()):
                continue
            variant, lr = min(
                ((v, lr) for v, runs in grid.items() for lr in runs), key=lambda vl: grid[vl[0]][vl[1]]["eval_ppl"]
            )
            seeds = [grid[variant][lr]]
            for seed in range(args.seed + 1, args.seed + args.seeds):
                r = store.get(RunSpec(method, variant, lr, seed), progress)
                progress.update(1)
                if r is not None:
                    seeds.append(r)
            summary[method] = {
                "variant": variant, "lr": lr, "seeds": seeds, "grid": grid, "missing": store.missing.get(method, 0)
            }
    return {"summary": summary, "unavailable": store.unavailable, "trained": store.trained}


# ----------------------------------------------------------------------------- verdicts
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def gap_statement(ours: list[float], ref: list[float]) -> tuple[float, float, str]:
    """Perplexity gap of ``ours`` against ``ref`` in %, its seed noise in %, and the statement.

    Both lists hold one perplexity per seed, in the same seed order (every
    method trains with the same seeds: the same initialisation and batches),
    so the noise is paired: the standard deviation over seeds of the per-seed
    gap, which removes what a seed does to every method alike. 0 with one seed.
    """
    gap = 100.0 * (statistics.fmean(ours) / statistics.fmean(ref) - 1.0)
    per_seed = [100.0 * (o / r - 1.0) for o, r in zip(ours, ref)]
    noise = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
    if abs(gap) <= PARITY_PCT:
        text = f"within {gap:+.2f}% (parity: |gap| ≤ {PARITY_PCT:g}%)"
    elif gap < 0:
        text = f"ahead by {-gap:.2f}%"
    else:
        text = f"behind by {gap:.2f}%"
    return gap, noise, text


#: (label, method, reference, bar, test on the gap in % and the seed noise in %)
BARS = [
    ("GaLore vs AdamW", "galore", "adamw", f"parity, |gap| ≤ {PARITY_PCT:g}%", lambda g, n: abs(g) <= PARITY_PCT),
    ("8-bit GaLore vs 8-bit Adam", "galore_8bit", "adamw8bit", f"parity, |gap| ≤ {PARITY_PCT:g}%",
     lambda g, n: abs(g) <= PARITY_PCT),
    ("Q-GaLore vs GaLore", "q_galore", "galore", f"parity, |gap| ≤ {PARITY_PCT:g}%", lambda g, n: abs(g) <= PARITY_PCT),
    ("online_pca vs GaLore", "online_pca", "galore", "at or ahead, gap ≤ 0", lambda g, n: g <= 0),
    ("LoRA vs GaLore", "lora", "galore", "measurably behind, gap > 1% and > 2 × noise", lambda g, n: g > 1 and g > 2 * n),
]


def checks(ppls: dict[str, list[float]]) -> list[str]:
    """The bars as computed statements; ``ppls`` maps a method to its perplexity per seed.

    Never asserted: this is a benchmark, not a test. A bar reads "met" only
    when the measured gap is inside it.
    """
    out = []
    for label, ours, ref, bar, inside in BARS:
        if ours in ppls and ref in ppls:
            gap, noise, text = gap_statement(ppls[ours], ppls[ref])
            if len(ppls[ours]) > 1 and len(ppls[ref]) > 1:
                text += f", paired seed noise ±{noise:.2f}%" + (
                    " (the gap is within 2 × noise)" if abs(gap) <= 2 * noise else ""
                )
            out.append(f"{label}: {text} (bar: {bar}) -> {'met' if inside(gap, noise) else 'MISSED'}")
    return out


def ranking_stable(histories: dict[str, list[list[dict]]]) -> tuple[bool, list[str], list[str]]:
    """Whether the methods rank the same at the last two evaluations (eval loss averaged over seeds)."""
    def ranking(index: int) -> list[str]:
        loss = {m: statistics.fmean(h[index]["eval_loss"] for h in runs) for m, runs in histories.items()}
        return sorted(loss, key=loss.get)

    last, before = ranking(-1), ranking(-2)
    return last == before, before, last


# ----------------------------------------------------------------------------- tables and plots
def sweep_tables(result: dict, args: argparse.Namespace) -> str:
    summary = result["summary"]
    lines = [
        "| method | best rule | best lr | eval ppl (mean ± std) | seeds | optimizer state MB | state vs AdamW | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_state = summary["adamw"]["seeds"][0]["optimizer_state_bytes"] if "adamw" in summary else None
    for method, s in summary.items():
        ppl_mean, ppl_std = mean_std([r["eval_ppl"] for r in s["seeds"]])
        first = s["seeds"][0]
        state = first["optimizer_state_bytes"]
        rel = f"{state / base_state:.3f}" if base_state else "–"
        per_step = statistics.fmean(r["train_seconds"] for r in s["seeds"]) / args.steps
        rule = s["variant"] + (f" (partial sweep: {s['missing']} runs missing)" if s.get("missing") else "")
        lines.append(
            f"| {method} | {rule} | {s['lr']:g} | {ppl_mean:.2f} ± {ppl_std:.2f} | {len(s['seeds'])} | "
            f"{state / 2**20:.2f} | {rel} | {per_step:.3f} |"
        )
    for method, why in result["unavailable"].items():
        lines.append(f"| {method} | unavailable: {why} | | | | | | |")
    lines += ["", "Sweep (seed 0, final eval perplexity; **bold** = best of the method):", ""]
    def factor(method: str, lr: float) -> float:
        return float(f"{lr / METHODS[method].lr:.4g}")

    all_factors = sorted({factor(m, lr) for m, s in summary.items() for runs in s["grid"].values() for lr in runs})
    lines.append("| method / rule | " + " | ".join(f"{f:g}× paper lr" for f in all_factors) + " |")
    lines.append("|---|" + "---|" * len(all_factors))
    for method, s in summary.items():
        for variant, runs in s["grid"].items():
            by_factor = {factor(method, lr): lr for lr in runs}
            cells = []
            for f in all_factors:
                lr = by_factor.get(f)
                if lr is None:
                    cells.append("")
                    continue
                text = f"{runs[lr]['eval_ppl']:.1f} (lr {lr:g})"
                cells.append(f"**{text}**" if (variant, lr) == (s["variant"], s["lr"]) else text)
            lines.append(f"| {method} / {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    for i, (method, s) in enumerate(result["summary"].items()):
        color = f"C{i}"
        for variant, runs in s["grid"].items():
            lrs = sorted(runs)
            left.plot(lrs, [runs[lr]["eval_ppl"] for lr in lrs], marker="o", ms=3, color=color,
                      ls="-" if variant == "split" else "--", label=f"{method} / {variant}")
        steps = [h["step"] for h in s["seeds"][0]["history"]]
        curve = [statistics.fmean(r["history"][k]["eval_loss"] for r in s["seeds"]) for k in range(len(steps))]
        ppl_mean, ppl_std = mean_std([r["eval_ppl"] for r in s["seeds"]])
        right.plot(steps, curve, marker="o", ms=3, color=color,
                   label=f"{method} ({s['variant']}, lr {s['lr']:g}): {ppl_mean:.1f} ± {ppl_std:.1f}")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("peak learning rate")
    left.set_ylabel("final eval perplexity (seed 0)")
    left.set_title("lr sweep (dashed: uniform rule, solid: split rule)", fontsize=9)
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=7)
    right.set_xlabel("optimizer step")
    right.set_ylabel("held-out loss (nats/token), mean over seeds")
    right.set_title("best configuration of each method", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=7, title="final ppl (mean ± std)", title_fontsize=7)
    finals = [h["eval_loss"] for s in result["summary"].values() for r in s["seeds"]
              for h in r["history"][len(r["history"]) // 3:]]
    if finals:
        right.set_ylim(min(finals) - 0.1, max(finals) + 0.2)
    fig.suptitle(textwrap.fill(title, 140), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown_table(results: dict[str, dict], unavailable: dict[str, str]) -> str:
    """Single runs (no sweep): one row per method at its paper lr."""
    base = results.get("adamw")
    lines = [
        "| method | lr | eval loss | eval ppl | ppl vs AdamW | optimizer state MB | state vs AdamW | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rel_ppl = f"{100 * (r['eval_ppl'] / base['eval_ppl'] - 1):+.2f}%" if base else "–"
        rel_mem = f"{r['optimizer_state_bytes'] / base['optimizer_state_bytes']:.3f}" if base else "–"
        lines.append(
            f"| {name} | {r['learning_rate']:g} | {r['eval_loss']:.4f} | {r['eval_ppl']:.2f} | {rel_ppl} | "
            f"{r['optimizer_state_bytes'] / 2**20:.2f} | {rel_mem} | {r['train_seconds']:.0f} |"
        )
    for name, why in unavailable.items():
        lines.append(f"| {name} | unavailable: {why} | | | | | | |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, r in results.items():
        steps = [h["step"] for h in r["history"]]
        ax.plot(steps, [h["eval_loss"] for h in r["history"]], marker="o", ms=3, label=f"{name} ({r['eval_ppl']:.1f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(textwrap.fill(title, 95), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(title="method (final ppl)", fontsize=8)
    finals = [h["eval_loss"] for r in results.values() for h in r["history"][len(r["history"]) // 3 :]]
    if finals:
        ax.set_ylim(min(finals) - 0.1, max(finals) + 0.2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry points
def setup_line(args: argparse.Namespace) -> str:
    return (
        f"{args.model_config}, vocab 8192, {args.batch_size}x{args.max_length} tokens/step, {args.steps} steps, "
        f"rank {args.rank or 'hidden/4'}, gap {args.update_proj_gap}, fp32 CPU ({args.threads} threads); "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}; {time.strftime('%Y-%m-%d')}"
    )


def main_sweep(args: argparse.Namespace) -> dict:
    result = run_sweep(args)
    summary = result["summary"]
    title = f"lr sweep: {setup_line(args)}; {args.seeds} seeds at each method's best lr"
    print(f"\nSetup: {title}\n")
    print(sweep_tables(result, args))
    print()
    for line in checks({m: [r["eval_ppl"] for r in s["seeds"]] for m, s in summary.items()}):
        print(line)
    if len(summary) > 1 and all(len(s["seeds"][0]["history"]) > 1 for s in summary.values()):
        stable, before, last = ranking_stable({m: [r["history"] for r in s["seeds"]] for m, s in summary.items()})
        print(f"Ranking at the last two evaluations: {' < '.join(before)} | {' < '.join(last)} -> "
              f"{'stable' if stable else 'NOT stable: the runs are too short to rank these methods'}")
    if summary and args.plot:
        plot_sweep(result, Path(args.plot), title)
        print(f"\nsweep curves: {args.plot}")
    print(f"({result['trained']} runs trained now, the rest read from {args.results_dir})")
    return result


def main_single(args: argparse.Namespace) -> dict[str, dict]:
    lr_overrides = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        lr_overrides[name] = float(value)
    results_dir = Path(args.results_dir)
    results: dict[str, dict] = {}
    unavailable: dict[str, str] = {}
    for method in args.methods:
        cached = results_dir / f"{method}.json"
        if args.reuse and cached.exists():
            results[method] = json.loads(cached.read_text())
            continue
        print(f"== {method} ({args.steps} steps)", flush=True)
        pargs = PretrainArguments(
            method=method, model_config=args.model_config, learning_rate=lr_overrides.get(method), rank=args.rank,
            update_proj_gap=args.update_proj_gap, num_training_steps=args.steps, max_length=args.max_length,
            batch_size=args.batch_size, eval_every=args.eval_every, eval_tokens=args.eval_tokens, seed=args.seed,
            output_dir=str(results_dir / method), log_every=max(1, args.steps // 20), export_model=False,
        )
        try:
            result = train(pargs)
        except UnsupportedSetupError as exc:  # e.g. bitsandbytes or peft not installed
            unavailable[method] = str(exc)
            print(f"   unavailable: {exc}", flush=True)
            continue
        results[method] = result
        results_dir.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(result))

    for item in args.extra:
        label, _, path = item.partition("=")
        results[label] = json.loads(Path(path).read_text())

    title = f"{setup_line(args)}, seed {args.seed}, each method at its paper lr (no sweep)"
    print(f"\nSetup: {title}\n")
    print(markdown_table(results, unavailable))
    print("\nOne seed at the paper's lr, no sweep: the gaps below are not a ranking.")
    for line in checks({m: [r["eval_ppl"]] for m, r in results.items()}):
        print(line)
    if results and args.plot:
        plot(results, Path(args.plot), title)
        print(f"\ncurves: {args.plot}")
    return results


def main_paired(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Two methods at one lr over the same seeds: the gap and whether it is within the paired seed noise."""
    from tqdm.auto import tqdm

    store = SweepStore(Path(args.results_dir), args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs: dict[str, list[dict]] = {}
    with tqdm(total=2 * len(seeds), desc="paired", unit="run", dynamic_ncols=True) as progress:
        for method in args.paired:
            runs[method] = []
            for seed in seeds:
                r = store.get(RunSpec(method, "split", args.paired_lr, seed), progress)
                progress.update(1)
                if r is not None:
                    runs[method].append(r)
    print(f"\nSetup: {setup_line(args)}; split rule, lr {args.paired_lr:g} for both, seeds {seeds}\n")
    print("| method | seed | eval ppl | basis refreshes | refresh s | energy-guard fallbacks to SVD |")
    print("|---|---|---|---|---|---|")
    for method, results in runs.items():
        for r in results:
            st = r.get("galore_stats", {})
            print(f"| {method} | {r['seed']} | {r['eval_ppl']:.2f} | {st.get('refreshes', '-')} | "
                  f"{st.get('refresh_seconds', float('nan')):.2f} | {st.get('energy_fallbacks', '-')} |")
    ours, ref = (runs[m] for m in args.paired)
    if len(ours) != len(seeds) or len(ref) != len(seeds):
        missing = {m: len(seeds) - len(r) for m, r in runs.items() if len(r) != len(seeds)}
        print(f"\nincomplete: runs missing {missing}; no verdict")
        return runs
    (m_ours, s_ours), (m_ref, s_ref) = mean_std([r["eval_ppl"] for r in ours]), mean_std([r["eval_ppl"] for r in ref])
    gap, noise, text = gap_statement([r["eval_ppl"] for r in ours], [r["eval_ppl"] for r in ref])
    print(f"\n{args.paired[0]} {m_ours:.2f} ± {s_ours:.2f} vs {args.paired[1]} {m_ref:.2f} ± {s_ref:.2f}: {text}")
    if len(seeds) > 1:
        within = abs(gap) <= 2 * noise
        print(f"paired seed noise ±{noise:.2f}%: the gap {gap:+.2f}% is "
              f"{'within' if within else 'OUTSIDE'} 2 × the paired seed noise")
    else:
        print("one seed: no seed noise, no verdict")
    return runs


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.paired:
        return main_paired(args)
    return main_sweep(args) if args.sweep else main_single(args)


if __name__ == "__main__":
    main()
