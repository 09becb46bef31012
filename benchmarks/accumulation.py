"""Gradient accumulation in the subspace: equivalence with full accumulation, and the memory it saves.

Two measurements (docs/benchmarks.md records both):

* ``--part equivalence``: the same small LLaMA trained by the three GaLore
  members (AdamW, 8-bit AdamW, Adafactor) four ways from one seed: one big
  batch, the regular optimizer accumulating in full (autograd's ``.grad``),
  layer-wise accumulating in the subspace (the default) and the regular
  optimizer's ``accumulate="lowrank"``; ``--micro`` micro-batches per step, a
  refresh every 2 steps, so refreshes fall inside the run. Reported: the
  largest parameter difference from the big batch, absolute and relative to
  the largest weight, against float32 re-association (the full-accumulation
  run's own difference from the big batch is the reference).
* ``--part memory``: one measured step (after a first step that makes the
  bases) of layer-wise GaLore-AdamW with ``--micro`` ∈ {1, 4, 16}
  micro-batches, accumulating in full or in the subspace, each in a fresh
  process: peak live gradient bytes (every ``.grad`` plus the subspace
  accumulators, sampled in a gradient hook before the optimizer's and after
  each micro-batch) and the peak RSS over the step minus the RSS before it,
  beside ``estimate_memory(..., grad_accum=k)``'s gradients.

    python benchmarks/accumulation.py --part equivalence            # ~1 min
    python benchmarks/accumulation.py --part memory                 # LLaMA-60M shape, fp32, ~3 min
    python benchmarks/accumulation.py --part memory --shape 350m --layers 4 --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from typing import Any

from llama7b_step import _reset_peak, _status_bytes, run_child

SHAPES = {
    "60m": {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8, "num_hidden_layers": 8},
    "350m": {"hidden_size": 1024, "intermediate_size": 2736, "num_attention_heads": 16, "num_hidden_layers": 24},
}
MEMBERS = ("adamw", "adamw8bit", "adafactor")
ACCUMULATIONS = (1, 4, 16)
MODES = ("full", "subspace")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("equivalence", "memory"), required=True)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="60m", help="LLaMA shape (GaLore Table 5)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per step (equivalence)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (equivalence)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("layers", "vocab", "rank", "batch", "seq", "micro", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}")
    return args


def _model(args: argparse.Namespace, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPES[args.shape])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    torch.manual_seed(seed)
    config = LlamaConfig(
        **shape, vocab_size=args.vocab, max_position_embeddings=max(256, args.seq), tie_word_embeddings=False
    )
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return LlamaForCausalLM(config).to(dtype).train(), config


def _optimizer(member: str, model, rank: int, gap: int, accumulate: str, layerwise: bool):
    import hf_galore

    cls, kwargs = {
        "adamw": (hf_galore.GaLoreAdamW, {"lr": 1e-3}),
        "adamw8bit": (hf_galore.GaLoreAdamW8bit, {"lr": 1e-3}),
        "adafactor": (hf_galore.GaLoreAdafactor, {"lr": 1e-3, "relative_step": False, "scale_parameter": False}),
    }[member]
    config = hf_galore.GaLoreConfig(
        rank=rank, update_proj_gap=gap, target_modules="all-linear", accumulate=accumulate, layerwise=layerwise
    )
    inner = cls(hf_galore.galore_param_groups(model, config), **kwargs)
    return hf_galore.LayerwiseOptimizer(inner) if layerwise else inner


def _batches(args: argparse.Namespace, count: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator) for _ in range(count)]


def _window(model, optimizer, batches, layerwise: bool) -> None:
    optimizer.zero_grad()
    for i, ids in enumerate(batches):
        hold = layerwise and i < len(batches) - 1
        with optimizer.accumulating() if hold else contextlib.nullcontext():
            (model(input_ids=ids, labels=ids).loss / len(batches)).backward()
    optimizer.step()


# ------------------------------------------------------------------ equivalence
def equivalence(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional

        def tqdm(items, **_):
            return items

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = []
    for member in tqdm(MEMBERS, desc="members", file=sys.stderr):
        if member == "adamw8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                rows.append({"member": member, "skipped": "bitsandbytes is not installed"})
                continue
        base, _ = _model(args)
        ways = {
            "big batch": {"accumulate": "full", "layerwise": False, "micro": 1},
            "full accumulation (regular)": {"accumulate": "full", "layerwise": False, "micro": args.micro},
            "subspace (layer-wise default)": {"accumulate": "auto", "layerwise": True, "micro": args.micro},
            "subspace (regular, accumulate=lowrank)": {"accumulate": "lowrank", "layerwise": False, "micro": args.micro},
        }
        models = {}
        for name, way in ways.items():
            model = copy.deepcopy(base)
            optimizer = _optimizer(member, model, args.rank, 2, way["accumulate"], way["layerwise"])
            for step in range(args.steps):
                batches = _batches(args, args.micro, seed=100 + step)
                if way["micro"] == 1:  # the same sequences as one batch: the mean of equal micro-batch means
                    batches = [torch.cat(batches)]
                _window(model, optimizer, batches, way["layerwise"])
            models[name] = model
        reference, full = models["big batch"], models["full accumulation (regular)"]
        scale = max(p.abs().max().item() for p in reference.parameters())
        for name, model in models.items():
            if name == "big batch":
                continue
            diff = max((p - q).abs().max().item() for p, q in zip(reference.parameters(), model.parameters()))
            vs_full = max((p - q).abs().max().item() for p, q in zip(full.parameters(), model.parameters()))
            rows.append(
                {"member": member, "way": name, "max_abs_diff": diff, "relative": diff / scale, "vs_full": vs_full}
            )
        rows[-1]["r_error"] = _projected_gradient_error(args, member, models["subspace (regular, accumulate=lowrank)"])
    return rows


def _projected_gradient_error(args: argparse.Namespace, member: str, model) -> float:
    """max over the projected weights of ‖Σ_k PᵀG_k − Pᵀ(Σ_k G_k)‖ / ‖Pᵀ(Σ_k G_k)‖ for one more window: the
    optimizer's accumulator (``accumulate_gradient``) against the projection of the summed gradient."""
    import torch

    from hf_galore.optim.lowrank import load_bases
    from hf_galore.projectors.geometry import as_matrix, matrix_shape, project, sides_for

    optimizer = _optimizer(member, model, args.rank, 2, "full", False)
    _window(model, optimizer, _batches(args, 1, seed=7), False)  # step 0 of this optimizer: every basis
    projected = [(p, g) for g in optimizer.param_groups if "rank" in g for p in g["params"]]
    grads = {p: [] for p, _ in projected}
    for ids in _batches(args, args.micro, seed=8):
        optimizer.zero_grad()
        (model(input_ids=ids, labels=ids).loss / args.micro).backward()
        for p, _ in projected:
            grads[p].append(p.grad.clone())
    optimizer.zero_grad()
    worst = 0.0
    with torch.no_grad():
        for p, group in projected:
            for g in grads[p]:
                p.grad = g.clone()
                assert optimizer.accumulate_gradient(p)
            state = optimizer.state[p]
            sides = sides_for(group["proj_type"], matrix_shape(p.shape))
            exact = project(as_matrix(sum(grads[p])), load_bases(state, group, sides), sides)
            got = optimizer.pending_gradient(p).low
            worst = max(worst, float((got - exact).norm() / exact.norm()))
    optimizer.zero_grad()
    return worst


def render_equivalence(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        (f"LLaMA-{args.shape} shape, {args.layers or SHAPES[args.shape]['num_hidden_layers']} layers, vocab {args.vocab}, "
        f"{args.dtype}, rank {args.rank}, refresh every 2 steps, {args.steps} steps of {args.micro} micro-batches "
        f"of {args.batch}x{args.seq}; difference from one big batch of the same sequences"),
        "",
        ("| member | accumulation | max abs diff from the big batch | / max abs weight | max abs diff from full "
        "accumulation |"),
        "|---|---|---:|---:|---:|",
    ]
    errors = []
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['member']} | skipped: {row['skipped']} | | | |")
            continue
        lines.append(
            f"| {row['member']} | {row['way']} | {row['max_abs_diff']:.3g} | {row['relative']:.3g} | "
            f"{row['vs_full']:.3g} |"
        )
        if "r_error" in row:
            errors.append(f"{row['member']} {row['r_error']:.2g}")
    lines += [
        "",
        (f"Accumulated R against the projection of the summed gradient, one window of {args.micro} micro-batches "
        f"after the runs (max relative error over the projected weights): {', '.join(errors)}."),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------- memory
def measure_memory(args: argparse.Namespace, mode: str, micro: int) -> dict[str, Any]:
    """One step of ``micro`` micro-batches after a first step (bases made), in this process."""
    import torch

    import hf_galore

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, _config = _model(args)
    params = list(model.parameters())
    optimizer = _optimizer("adamw", model, args.rank, 200, "full" if mode == "full" else "auto", True)
    inner = optimizer.optimizer
    live = {"peak": 0, "on": False}

    def live_bytes() -> int:
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        return grads + sum(e.low.numel() * e.low.element_size() for e in inner._pending.values())

    def sample(_param) -> None:
        if live["on"]:
            live["peak"] = max(live["peak"], live_bytes())

    optimizer.remove_hooks()
    for p in params:  # before the optimizer's hooks: the gradient just produced is counted
        p.register_post_accumulate_grad_hook(sample)
    optimizer.register_hooks()
    _window(model, optimizer, _batches(args, 1, seed=1), True)  # step 0: every basis
    batches = _batches(args, micro, seed=2)
    result: dict[str, Any] = {"mode": mode, "micro": micro}
    live["on"] = True
    result["rss_before"] = _status_bytes("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    optimizer.zero_grad()
    for i, ids in enumerate(batches):
        with optimizer.accumulating() if i < micro - 1 else contextlib.nullcontext():
            (model(input_ids=ids, labels=ids).loss / micro).backward()
        live["peak"] = max(live["peak"], live_bytes())
    optimizer.step()
    result["seconds"] = time.perf_counter() - started
    result["rss_peak"] = _status_bytes("VmHWM")
    live["on"] = False
    estimate = hf_galore.estimate_memory(
        model,
        "galore_layerwise",
        rank=args.rank,
        dtype=args.dtype,
        batch_size=args.batch,
        seq_len=args.seq,
        grad_accum=micro,
        options={"accumulate": "full" if mode == "full" else "auto"},
    )
    all_grads = sum(p.numel() * p.element_size() for p in params)
    result.update(
        peak_live_grad=live["peak"],
        estimate_gradients=estimate.gradients,
        estimate_above_steady=estimate.gradients + estimate.activations + estimate.transient,
        all_grads=all_grads,
        params=sum(p.numel() for p in params),
    )
    return result


def render_memory(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    mib = 2**20
    lines = [
        (f"LLaMA-{args.shape} shape, {args.layers or SHAPES[args.shape]['num_hidden_layers']} layers, vocab "
        f"{args.vocab} ({rows[0]['params'] / 1e6:.1f}M parameters, all gradients {rows[0]['all_grads'] / mib:.1f} MiB), "
        f"{args.dtype}, layer-wise GaLore-AdamW rank {args.rank}, micro-batch {args.batch}x{args.seq}; the step "
        "after the one that makes the bases"),
        "",
        ("| micro-batches | accumulation | peak live gradients MiB | estimate MiB | measured / estimate "
        "| peak RSS over the step MiB | estimate: gradients + activations + transient MiB | step s |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rss = (r["rss_peak"] - r["rss_before"]) / mib
        lines.append(
            f"| {r['micro']} | {r['mode']} | {r['peak_live_grad'] / mib:.1f} | {r['estimate_gradients'] / mib:.1f} | "
            f"{r['peak_live_grad'] / r['estimate_gradients']:.3f} | {rss:.1f} | {r['estimate_above_steady'] / mib:.1f} | "
            f"{r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def _child_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors leave the process: RSS follows live memory
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.child:
        mode, micro = args.child.split(":")
        print(json.dumps(measure_memory(args, mode, int(micro))))
        return 0
    if args.part == "equivalence":
        rows = equivalence(args)
        print(json.dumps(rows, indent=1) if args.json else render_equivalence(rows, args))
        return 0
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional

        def tqdm(items, **_):
            return items

    cases = [(mode, micro) for micro in ACCUMULATIONS for mode in MODES]
    cases = tqdm(cases, desc="processes", file=sys.stderr)
    rows = [run_child(__file__, argv, f"{mode}:{micro}", _child_env()) for mode, micro in cases]
    print(json.dumps(rows, indent=1) if args.json else render_memory(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
