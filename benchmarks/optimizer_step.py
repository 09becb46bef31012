"""Optimizer state bytes and step time on the GaLore paper's LLaMA-60M shape, all optimizers in one run.

    python benchmarks/optimizer_step.py                 # 30 steps x 2 rounds, gap 25
    python benchmarks/optimizer_step.py --steps 10 --rounds 1 --only ours_adamw galore_torch_adamw
    python benchmarks/optimizer_step.py --dtype bf16 --sr both --only ours_adamw   # rounding on vs off
    python benchmarks/optimizer_step.py --threads 1 --clock thread ...            # CPU time, for busy machines
    python benchmarks/optimizer_step.py --guard-off --interleave --only ours_adamw ours_adamw_guard_off  # NaN guard

Gradients are random (seeded) and assigned directly, so only ``optimizer.step()``
is timed. Each round runs every optimizer once, interleaved, from the same
initial weights; the step at ``--gap`` is a refresh step for GaLore optimizers
(all 56 projected weights refresh there), the others are plain steps. Prints a
markdown table: logical and retained state MiB, median plain-step ms (and its
ratio to torch AdamW and to galore-torch's GaLoreAdamW), refresh-step ms and
first-step ms. ``--guard-off`` adds ``ours_*_guard_off``: the same optimizer
with ``skip_nonfinite=False`` on every group (no found-inf check, exact torch
AdamW behaviour on a NaN), so one run measures what the guard costs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_llama, environment_line, galore_targets, median, state_bytes


def _groups(model, targets, rank, gap, extra=None):
    target_ids = {id(p) for p in targets}
    others = [p for p in model.parameters() if id(p) not in target_ids]
    lowrank = {"params": targets, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std", **(extra or {})}
    return [{"params": others}, lowrank]


def _factories(rank: int, gap: int, sr: str = "on", with_guard_off: bool = False):
    """name -> (model, targets) -> optimizer. Peers are imported lazily and skipped if absent.

    ``sr``: our optimizers with stochastic rounding of bf16/fp16 weights "on"
    (the default), "off", or "both" (each twice, ``<name>_no_sr`` without).
    ``with_guard_off`` adds ``<name>_guard_off`` (``skip_nonfinite=False``) for ours.
    """

    def torch_adamw(model, targets):
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def bnb_adamw8bit(model, targets):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.0)

    def galore_torch_adamw(model, targets):
        import galore_torch

        return galore_torch.GaLoreAdamW(_groups(model, targets, rank, gap), lr=1e-3, no_deprecation_warning=True)

    def galore_torch_adamw8bit(model, targets):
        import galore_torch

        return galore_torch.GaLoreAdamW8bit(_groups(model, targets, rank, gap), lr=1e-3)

    def ours_adamw(model, targets):
        import hf_galore

        return hf_galore.GaLoreAdamW(_groups(model, targets, rank, gap), lr=1e-3)

    def ours_adamw8bit(model, targets):
        import hf_galore

        return hf_galore.GaLoreAdamW8bit(_groups(model, targets, rank, gap), lr=1e-3)

    def ours_adafactor(model, targets):
        import hf_galore

        return hf_galore.GaLoreAdafactor(
            _groups(model, targets, rank, gap), lr=1e-3, relative_step=False, scale_parameter=False
        )

    factories = {f.__name__: f for f in (
        torch_adamw, bnb_adamw8bit, galore_torch_adamw, galore_torch_adamw8bit, ours_adamw, ours_adamw8bit, ours_adafactor
    )}
    for name in [n for n in factories if n.startswith("ours_")]:
        with_sr = factories[name]

        def without_sr(model, targets, _with=with_sr):
            optimizer = _with(model, targets)
            for group in optimizer.param_groups:
                group["stochastic_rounding"] = False
            return optimizer

        if sr == "off":
            factories[name] = without_sr
        elif sr == "both":
            factories[f"{name}_no_sr"] = without_sr
    if with_guard_off:
        for name in [n for n in factories if n.startswith("ours_")]:

            def guard_off(model, targets, _with=factories[name]):
                optimizer = _with(model, targets)
                for group in optimizer.param_groups:
                    group["skip_nonfinite"] = False
                return optimizer

            factories[f"{name}_guard_off"] = guard_off
    return factories


@contextlib.contextmanager
def _cpu_safe_cuda_synchronize():
    """galore-torch's 8-bit step calls torch.cuda.synchronize() unconditionally (peer defect 1)."""
    original = torch.cuda.synchronize
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield
    finally:
        torch.cuda.synchronize = original


def _timed_step(optimizer, params, grads, result: dict, step: int, gap: int, clock) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    start = clock()
    optimizer.step()
    elapsed = (clock() - start) * 1e3
    kind = "first" if step == 0 else "refresh" if step % gap == 0 else "plain"
    result[kind].append(elapsed)


def _interleaved_round(args, model, targets, params, initial, grad_sets, factories, names, results, bar, clock) -> None:
    """Every optimizer takes step ``t`` before any takes step ``t+1`` (order alternating), one model.

    On a shared machine whose load drifts, this compares optimizers under the
    same conditions (e.g. the guard's cost, a few percent); the weights each
    optimizer sees are then not its own trajectory, which step time does not
    depend on.
    """
    model.load_state_dict(initial)
    optimizers = {name: factories[name](model, targets) for name in names}
    for step in range(args.steps):
        order = names if step % 2 == 0 else names[::-1]
        for name in order:
            _timed_step(optimizers[name], params, grad_sets[step % 3], results[name], step, args.gap, clock)
            bar.update(1)
    for name in names:
        results[name]["bytes"] = state_bytes(optimizers[name])


def run(args) -> list[dict]:
    model = build_llama(seed=0).to(_DTYPES[args.dtype])
    targets = galore_targets(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    grad_sets = [[(torch.randn(p.shape, generator=gen) * 1e-2).to(p.dtype) for p in params] for _ in range(3)]
    factories = _factories(args.rank, args.gap, args.sr, with_guard_off=args.guard_off)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    names = args.only or list(factories)
    results = {n: {"plain": [], "refresh": [], "first": [], "bytes": None} for n in names}
    total = args.rounds * len(names) * args.steps
    with tqdm(total=total, desc="optimizer steps", file=sys.stderr) as bar, _cpu_safe_cuda_synchronize():
        for _ in range(args.rounds):
            if args.interleave:
                _interleaved_round(args, model, targets, params, initial, grad_sets, factories, names, results, bar, clock)
                continue
            for name in names:
                model.load_state_dict(initial)
                try:
                    optimizer = factories[name](model, targets)
                except ImportError as exc:
                    print(f"skipping {name}: {exc}", file=sys.stderr)
                    bar.update(args.steps)
                    continue
                for step in range(args.steps):
                    _timed_step(optimizer, params, grad_sets[step % 3], results[name], step, args.gap, clock)
                    bar.update(1)
                results[name]["bytes"] = state_bytes(optimizer)
                del optimizer
    rows = []
    for name in names:
        r = results[name]
        if r["bytes"] is None:
            continue
        rows.append({
            "optimizer": name,
            "logical_mib": r["bytes"][0] / 2**20,
            "retained_mib": r["bytes"][1] / 2**20,
            "step_ms": median(r["plain"]),
            "refresh_ms": median(r["refresh"]),
            "first_ms": median(r["first"]),
        })
    return rows


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def render(rows: list[dict]) -> str:
    by_name = {r["optimizer"]: r for r in rows}
    adamw = by_name.get("torch_adamw", {}).get("step_ms")
    peer = by_name.get("galore_torch_adamw", {}).get("step_ms")
    lines = [
        "| optimizer | logical MiB | retained MiB | step ms (median) | × torch AdamW | × galore-torch AdamW | refresh step ms | first step ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    def ratio(value: float, base: float | None) -> str:
        return f"{value / base:.2f}" if base else "–"

    for r in rows:
        refresh = f"{r['refresh_ms']:.0f}" if r["refresh_ms"] == r["refresh_ms"] else "–"
        lines.append(
            f"| {r['optimizer']} | {r['logical_mib']:.2f} | {r['retained_mib']:.2f} | {r['step_ms']:.1f} | "
            f"{ratio(r['step_ms'], adamw)} | {ratio(r['step_ms'], peer)} | {refresh} | {r['first_ms']:.0f} |"
        )
    for name, r in by_name.items():
        off = by_name.get(f"{name}_guard_off")
        if off is not None:
            lines.append(
                f"\nnon-finite guard, {name}: plain step {r['step_ms']:.1f} ms on vs {off['step_ms']:.1f} ms off "
                f"({100 * (r['step_ms'] / off['step_ms'] - 1):+.1f}%)"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="steps per optimizer per round (default 30)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--rank", type=int, default=128, help="GaLore rank (paper: 128 at 60M)")
    parser.add_argument("--gap", type=int, default=25, help="update_proj_gap; step `gap` is timed as a refresh step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", nargs="*", help="subset of optimizers to run")
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="'thread': CPU time of the calling thread (needs --threads 1; steadier on a shared machine)",
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="weight (and gradient) dtype")
    parser.add_argument(
        "--sr",
        choices=("on", "off", "both"),
        default="on",
        help="stochastic rounding of our optimizers' bf16 updates; 'both' adds <name>_no_sr rows (default on)",
    )
    parser.add_argument(
        "--guard-off",
        action="store_true",
        help="also run ours_*_guard_off (skip_nonfinite=False): the cost of the non-finite-gradient guard",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="alternate the optimizers step by step on one model (fairer under a drifting load)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        parser.error("--clock thread measures one thread: add --threads 1")
    if args.only and args.sr == "both":
        args.only = [m for n in args.only for m in ((n, f"{n}_no_sr") if n.startswith("ours_") else (n,))]
    rows = run(args)
    print(f"LLaMA-60M shape, {args.dtype}, {args.clock} clock, rank {args.rank}, {args.steps} steps x {args.rounds} rounds; {environment_line()}")
    print(render(rows))


if __name__ == "__main__":
    main()
