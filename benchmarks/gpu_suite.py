"""The prepared GPU check: LLaMA-7B steps on one accelerator, memory and time, for the headline methods.

For each method, in a fresh process: LLaMA-7B (GaLore Table 5 shape) built on
the meta device and materialised on the accelerator in bf16 (cheap
deterministic init, ``llama7b_step.build_model``), activation checkpointing,
batch ``--batch`` × ``--seq``; three optimizer steps with
``update_proj_gap=2``, so that step 0 refreshes every basis cold, step 1 does
not refresh and step 2 refreshes every basis warm:

* ``adamw8bit``: ``GaLoreAdamW8bit`` on every weight (bitsandbytes' 8-bit
  AdamW), gradients for the whole model — the peer baseline;
* ``galore_8bit_layerwise``: 8-bit GaLore, layer-wise, rank ``--rank``;
* ``q_galore_layerwise``: INT8 weights, INT4 bases, lazy refresh, layer-wise.

Reported: peak memory allocated and reserved (``torch.cuda.max_memory_*``;
on the CPU: the peak resident set less the interpreter's), the first step's
time, a plain step's, and the refresh of all projected weights cold
(step 0 − step 1) and warm (step 2 − step 1), beside ``estimate_memory``.
Targets (GaLore / Q-GaLore papers' claims): galore_8bit_layerwise ≤ 18 GB
allocated and ≤ 20 GB reserved, first step ≤ 30 s; Q-GaLore ≤ 12 GB.

    python benchmarks/gpu_suite.py                        # on a GPU machine: all methods, ~5 minutes on an H100
    python benchmarks/gpu_suite.py --preset tiny --device cpu   # the CPU smoke test the suite runs

Needs bitsandbytes with its CUDA kernels on the GPU machine. Results go to
``--out`` (JSON) method by method, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import llama7b_step as seven

METHODS = ("adamw8bit", "galore_8bit_layerwise", "q_galore_layerwise")
TARGETS = {
    "galore_8bit_layerwise": {"allocated": 18e9, "reserved": 20e9, "first_step_seconds": 30.0},
    "q_galore_layerwise": {"allocated": 12e9},
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_suite.json"


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default="all", help=f"one of {', '.join(METHODS)}, a comma list, or all")
    parser.add_argument("--preset", default="llama_7b", help="shipped preset or tiny (default llama_7b)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--rank", type=int, default=None, help="projection rank (default 1024; tiny: 8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--projector", default=None, help="basis finder (default: the package's default)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default %(default)s)")
    parser.add_argument("--rerun", action="store_true", help="measure methods already in --out again")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank is None:
        args.rank = 8 if args.preset == "tiny" else 1024
    methods = METHODS if args.method == "all" else tuple(m.strip() for m in args.method.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--method {args.method!r}: unknown {unknown}; valid: {', '.join(METHODS)} or all")
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    args.methods = methods
    return args


class _Meter:
    """Peak memory and synchronised wall time on the device (CUDA counters, or the CPU's resident set)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.cuda = torch, device == "cuda"
        self.baseline = 0 if self.cuda else seven._status_bytes("VmRSS")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def peaks(self) -> dict[str, int]:
        self.sync()
        if self.cuda:
            return {
                "allocated": self.torch.cuda.max_memory_allocated(),
                "reserved": self.torch.cuda.max_memory_reserved(),
            }
        resident = seven._status_bytes("VmHWM") - self.baseline
        return {"allocated": resident, "reserved": resident}


def measure(method: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import hf_galore

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; run on a GPU machine or pass --device cpu")
    if args.device == "cpu":
        seven.limit_allocator_retention()
        import bitsandbytes.functional  # noqa: F401  (loaded before the baseline)
        import transformers.models.llama.modeling_llama  # noqa: F401
    meter = _Meter(args.device)
    config = seven._config(args.preset)
    model = seven.build_model(config, torch.bfloat16, device=args.device)
    if method == "q_galore_layerwise":
        hf_galore.prepare_model_for_int8_weights(model, "all-linear", progress=True)
    if method == "adamw8bit":
        optimizer = inner = hf_galore.GaLoreAdamW8bit(model.parameters(), lr=args.lr)
    else:
        optimizer, inner = seven.build_optimizer(method, model, args, update_proj_gap=2)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    times, losses = [], []
    for _ in range(3):
        started = meter.now()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(meter.now() - started)
        losses.append(loss.item())
    est = hf_galore.estimate_memory(
        config,
        method,
        rank=args.rank,
        dtype="bf16",
        batch_size=args.batch,
        seq_len=args.seq,
        activation_checkpointing=True,
        **({"projector": args.projector} if args.projector and method != "adamw8bit" else {}),
    )
    stats = getattr(inner, "galore_stats", None)
    return {
        "method": method,
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "rank": args.rank,
        "batch": args.batch,
        "seq": args.seq,
        **meter.peaks(),
        "first_step_seconds": times[0],
        "plain_step_seconds": times[1],
        "refresh_cold_seconds": times[0] - times[1],
        "refresh_warm_seconds": times[2] - times[1],
        "refreshes": stats.refreshes if stats is not None else 0,
        "losses": losses,
        "estimate_total": est.total,
        "estimate_peak": est.peak,
    }


def verdicts(got: dict[str, Any]) -> list[str]:
    """'met' / 'missed' per target of the method (only the 7B preset is judged)."""
    if got["preset"] != "llama_7b":
        return []
    out = []
    for name, bound in TARGETS.get(got["method"], {}).items():
        value = got[name]
        shown = f"{value:.1f} s" if name.endswith("seconds") else f"{value / 1e9:.2f} GB"
        limit = f"{bound:.0f} s" if name.endswith("seconds") else f"{bound / 1e9:.0f} GB"
        out.append(f"{name} {shown} (target <= {limit}): {'met' if value <= bound else 'missed'}")
    return out


def render(results: list[dict[str, Any]]) -> str:
    gb = 1e9
    lines = [
        (
            "| method | device | allocated GB | reserved GB | estimate peak GB | first step s | plain step s "
            "| refresh cold s | refresh warm s | loss 0 -> 2 |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for got in results:
        lines.append(
            f"| {got['method']} | {got['device']} | {got['allocated'] / gb:.2f} | {got['reserved'] / gb:.2f} "
            f"| {got['estimate_peak'] / gb:.2f} | {got['first_step_seconds']:.1f} | {got['plain_step_seconds']:.1f} "
            f"| {got['refresh_cold_seconds']:.1f} | {got['refresh_warm_seconds']:.1f} "
            f"| {got['losses'][0]:.3f} -> {got['losses'][-1]:.3f} |"
        )
    for got in results:
        lines.extend(f"{got['method']}: {v}" for v in verdicts(got))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return 0
    saved = seven._load(args.out)
    for method in args.methods:
        key = f"{method}|{args.preset}|{args.device}|r{args.rank}|{args.batch}x{args.seq}|{args.projector or 'default'}"
        if key not in saved or args.rerun:
            saved[key] = seven.run_child(__file__, argv, method)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(saved, indent=1, sort_keys=True))
    wanted = {m for m in args.methods}
    print(render([r for r in saved.values() if r["method"] in wanted and r["preset"] == args.preset]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
