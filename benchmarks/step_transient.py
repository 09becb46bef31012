"""Temporaries of one weight's optimizer step, measured as resident memory, beside ``estimate_memory``'s ``transient``.

A layer-wise step (``LayerwiseOptimizer``) updates one weight at a time inside
the backward pass, so its peak memory is the steady state plus the
activations and gradient live at that moment plus the *temporaries of one
weight's step*: a basis refresh (cold at the first step, warm later) and the
update (the base optimizer's kernel, the projection, and, for an INT8
weight, its row blocks). ``estimate_memory`` predicts that last term per
weight from the components' declarations (``refresh_transient_bytes``,
``update_transient_bytes``) and reports the largest as ``transient``. This
script measures it, weight shape by weight shape, without building the
model: one parameter of the shape (``--dtype``, or an ``Int8Linear`` for
Q-GaLore), a gradient of that dtype, and the method's optimizer; for each step it reads the
resident set after the step and the peak during it (``VmHWM``, reset before
the step), and reports ``peak − resident after`` (the step's own
temporaries; the state it creates stays, and is not a temporary).

Steps: 0 (cold refresh + update), 1 (update only), 2 (warm refresh +
update; ``update_proj_gap=2``). The process lowers glibc's mmap threshold as
``llama7b_step.py`` does, so freed temporaries leave the resident set.

    python benchmarks/step_transient.py                                  # LLaMA-7B shapes, both methods, bf16
    python benchmarks/step_transient.py --dtype fp32                     # the same in float32 (fast on any CPU)
    python benchmarks/step_transient.py --preset llama_60m --rank 128
    python benchmarks/step_transient.py --preset tiny --rank 8           # seconds (the CI smoke test)
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from llama7b_step import _config, _reset_peak, _status_bytes, limit_allocator_retention

METHODS = ("galore_8bit_layerwise", "q_galore_layerwise")
MIB = 2**20


def weight_shapes(config) -> Counter:
    """``(shape, kind)`` → count for the trainable weights of a LLaMA ``config`` (kind: ``target`` or ``full``)."""
    import torch
    from transformers import LlamaForCausalLM

    from hf_galore.memory import select_target_modules

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    chosen = set(select_target_modules(model, "all-linear"))
    targets = {id(m.weight) for n, m in model.named_modules() if n in chosen}
    return Counter(
        (tuple(p.shape), "target" if id(p) in targets else "full") for p in model.parameters() if p.dim() == 2
    )


def measure_shape(method: str, shape: tuple[int, int], kind: str, args: argparse.Namespace) -> dict:
    """Peak above the resident set after each of 3 steps of one weight of ``shape``; and the estimate."""
    import torch

    import hf_galore
    from hf_galore.memory.formulas import weight_transient_bytes

    m, n = shape
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    int8 = method == "q_galore_layerwise" and kind == "target"
    if int8:
        layer = hf_galore.Int8Linear(n, m, bias=False, dtype=dtype)
        layer.store_(torch.empty(m, n).uniform_(-0.03, 0.03, generator=torch.Generator().manual_seed(0)))
        param = layer.weight
    else:
        layer = None
        param = torch.nn.Parameter(torch.empty(m, n, dtype=dtype).uniform_(-0.03, 0.03))
    group: dict = {"params": [param]}
    if kind == "target":
        group.update(rank=args.rank, update_proj_gap=2)
        if args.projector:
            group["projector"] = args.projector
        if method == "q_galore_layerwise":
            group.update(quant="int4", refresh="lazy")
    optimizer = hf_galore.GaLoreAdamW8bit([group], lr=1e-3)
    full_group = optimizer.param_groups[0]
    estimate = weight_transient_bytes(
        type(optimizer), shape, full_group if kind == "target" else None, dtype=dtype, int8=int8
    )
    generator = torch.Generator().manual_seed(1)
    # a gradient-like (decaying-spectrum) gradient: the refresh's work depends on the spectrum
    left = torch.randn(m, 64, generator=generator) / torch.arange(1, 65).float()
    right = torch.randn(64, n, generator=generator)
    base = (left @ right).to(dtype)
    noise_scale = float(base.float().std()) * 0.05
    steps = []
    for step in range(3):
        param.grad = base + (torch.randn(m, n, generator=generator) * noise_scale).to(dtype)
        _reset_peak()
        optimizer.step()
        peak, after = _status_bytes("VmHWM"), _status_bytes("VmRSS")
        steps.append(peak - after)
        param.grad = None
    return {
        "method": method,
        "shape": list(shape),
        "kind": kind,
        "int8": int8,
        "measured": steps,
        "estimate": estimate,
        "fallbacks": int(optimizer.galore_stats.energy_fallbacks) if hasattr(optimizer, "galore_stats") else 0,
    }


def render(rows: list[dict], counts: Counter) -> str:
    lines = [
        (
            "| method | shape (count) | kind | step 0: cold refresh + update MiB | step 1: update MiB "
            "| step 2: warm refresh + update MiB | estimate MiB | largest / estimate |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        shape = tuple(row["shape"])
        kind = row["kind"] + (", INT8" if row["int8"] else "")
        cells = " | ".join(f"{b / MIB:.1f}" for b in row["measured"])
        ratio = max(row["measured"]) / row["estimate"] if row["estimate"] else float("nan")
        lines.append(
            f"| {row['method']} | {shape[0]}×{shape[1]} ({counts[shape, row['kind']]}) | {kind} | {cells} "
            f"| {row['estimate'] / MIB:.1f} | {ratio:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama_7b", help="shipped preset (llama_60m … llama_13b) or tiny")
    parser.add_argument("--method", default="all", help=f"one of {', '.join(METHODS)} or all (default)")
    parser.add_argument("--rank", type=int, default=1024, help="projection rank (default 1024)")
    parser.add_argument("--projector", default=None, help="basis finder (default: the package's default)")
    parser.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "fp32"),
        help="weights and gradients (default bf16; fp32 where the CPU has no fast bf16 matmul)",
    )
    args = parser.parse_args(argv)
    methods = METHODS if args.method == "all" else (args.method,)
    if any(m not in METHODS for m in methods):
        parser.error(f"--method {args.method!r}: valid: {', '.join(METHODS)} or all")
    if args.rank < 1:
        parser.error(f"--rank must be a positive integer, got {args.rank}")
    import torch
    from tqdm import tqdm

    torch.manual_seed(0)
    tuned = limit_allocator_retention()
    config = _config(args.preset)
    counts = weight_shapes(config)
    cases = [(method, shape, kind) for method in methods for shape, kind in sorted(counts)]
    for method in methods:  # warm-up: first-call allocations of the libraries are not a step's temporaries
        measure_shape(method, min(counts)[0], "target", args)
    rows = [measure_shape(m, s, k, args) for m, s, k in tqdm(cases, desc="weights", file=sys.stderr)]
    print(
        f"{args.preset}, {args.dtype}, rank {args.rank}, projector {args.projector or 'default'}, "
        f"allocator tuning {tuned}, {torch.get_num_threads()} threads"
    )
    print(render(rows, counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
