"""Peak memory of one training step: regular vs layer-wise GaLore, on a small LLaMA.

Layer-wise mode (docs/layerwise.md) updates each weight inside its gradient
hook and frees the gradient at once, so full gradients never coexist. This
script measures that, each mode in a fresh process, on the same model, batch
and seed:

* **peak live gradients**: the largest total of ``p.grad`` bytes held at any
  moment of backward + step, sampled in a gradient hook that runs before the
  optimizer's (so the gradient just produced is counted) and once more before
  ``optimizer.step()``;
* **peak RSS over the step** (CPU): ``VmHWM`` after resetting it through
  ``/proc/self/clear_refs`` right before the step, minus the resident size
  before the step (weights, optimizer states, allocator), with glibc's mmap
  threshold pinned so freed tensors really leave the process;
* **CUDA** (``--device cuda``): ``torch.cuda.max_memory_allocated`` over the
  step minus the allocation before it.

Target: layer-wise peak live gradients <= the largest single parameter's
gradient plus the gradients of parameters without a hook (none here).

    python benchmarks/layerwise_memory.py                 # LLaMA 512/1376, 4 layers, CPU
    python benchmarks/layerwise_memory.py --layers 8 --vocab 32000 --json
    python benchmarks/layerwise_memory.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

MODES = ("regular", "layerwise")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (LLaMA-60M: 512)")
    parser.add_argument("--intermediate", type=int, default=1376, help="MLP size (LLaMA-60M: 1376)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (LLaMA-60M: 8)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size (LLaMA: 32000)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=128, help="GaLore rank of the decoder-layer weights")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit", "adafactor"), default="adamw")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="weights and gradients",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--steps",
        type=int,
        default=2,
        help="steps run; the last one is measured (states exist)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------- one process
def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _build(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 256),
        tie_word_embeddings=False,
    )
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype)
    model.train()
    return model


def _param_groups(model, rank: int) -> list[dict[str, Any]]:
    """Every 2-D weight of the decoder layers low-rank (GaLore's attn + mlp targets), the rest full-rank."""
    lowrank = [p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2]
    ids = {id(p) for p in lowrank}
    others = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": others},
        {"params": lowrank, "rank": rank, "update_proj_gap": 200, "scale": 0.25},
    ]


def _optimizer(args: argparse.Namespace, model, mode: str):
    from hf_galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
    from hf_galore.optim.layerwise import LayerwiseOptimizer

    cls, kwargs = {
        "adamw": (GaLoreAdamW, {"lr": 1e-3}),
        "adamw8bit": (GaLoreAdamW8bit, {"lr": 1e-3}),
        "adafactor": (
            GaLoreAdafactor,
            {"lr": 1e-3, "relative_step": False, "scale_parameter": False},
        ),
    }[args.optimizer]
    inner = cls(_param_groups(model, args.rank), **kwargs)
    return LayerwiseOptimizer(inner) if mode == "layerwise" else inner


def measure(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Run ``args.steps`` steps in this process and measure the last one."""
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = _build(args)
    params = list(model.parameters())
    live = {"peak": 0, "on": False}

    def live_grad_bytes() -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)

    def sample(_param) -> None:
        if live["on"]:
            live["peak"] = max(live["peak"], live_grad_bytes())

    for p in params:  # registered before the optimizer's hooks, so they see the fresh gradient
        p.register_post_accumulate_grad_hook(sample)
    optimizer = _optimizer(args, model, mode)
    generator = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(args.device)
    cuda = args.device.startswith("cuda")
    result: dict[str, Any] = {"mode": mode}
    for step in range(args.steps):
        last = step == args.steps - 1
        optimizer.zero_grad(set_to_none=True)
        if last:
            live["on"] = True
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                result["cuda_before"] = torch.cuda.memory_allocated()
            result["rss_before"] = _rss_bytes("VmRSS")
            result["rss_reset"] = _reset_peak_rss()
            started = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if last:
            live["peak"] = max(live["peak"], live_grad_bytes())  # what regular mode holds at step()
        optimizer.step()
        if last:
            if cuda:
                torch.cuda.synchronize()
                result["cuda_peak"] = torch.cuda.max_memory_allocated()
            result["seconds"] = time.perf_counter() - started
            result["rss_peak"] = _rss_bytes("VmHWM")
            live["on"] = False
    grad_bytes = [p.numel() * p.element_size() for p in params if p.requires_grad]
    hooked = getattr(optimizer, "hooks_registered", False)
    result.update(
        peak_live_grad=live["peak"],
        all_grads=sum(grad_bytes),
        largest_grad=max(grad_bytes),
        unhooked_grads=0 if hooked else sum(grad_bytes),
        loss=float(loss.detach()),
        params=sum(p.numel() for p in params),
    )
    return result


# ----------------------------------------------------------------- the table
def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Fixed mmap threshold: tensors over 64 KiB are mapped and unmapped on free, so RSS follows live memory.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _run_child(argv: list[str], mode: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--child", mode],
        env=_child_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def render(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    regular, layerwise = results
    target = layerwise["largest_grad"] + layerwise["unhooked_grads"]
    lines = [
        (
            f"LLaMA {args.hidden}/{args.intermediate}, {args.layers} layers, vocab {args.vocab} "
            f"({regular['params'] / 1e6:.1f}M params), batch {args.batch}×{args.seq}, {args.dtype}, "
            f"GaLore-{args.optimizer} rank {args.rank}, device {args.device}, seed {args.seed}; "
            f"step {args.steps} measured"
        ),
        "",
        (
            "| mode | peak live grads (MiB) | peak RSS over step − before (MiB) | "
            + ("CUDA peak − before (MiB) | " if "cuda_peak" in regular else "")
            + "step (s) | loss |"
        ),
        "|---|---|---|" + ("---|" if "cuda_peak" in regular else "") + "---|---|",
    ]
    for r in results:
        rss = _mib(r["rss_peak"] - r["rss_before"]) if r["rss_reset"] else "n/a"
        cuda = f"{_mib(r['cuda_peak'] - r['cuda_before'])} | " if "cuda_peak" in r else ""
        lines.append(
            f"| {r['mode']} | {_mib(r['peak_live_grad'])} | {rss} | {cuda}{r['seconds']:.2f} | {r['loss']:.4f} |"
        )
    ok = layerwise["peak_live_grad"] <= target
    lines += [
        "",
        (
            f"All gradients: {_mib(regular['all_grads'])} MiB; largest single gradient: "
            f"{_mib(layerwise['largest_grad'])} MiB; unhooked: {_mib(layerwise['unhooked_grads'])} MiB."
        ),
        (
            f"Layer-wise / regular peak live gradients: {layerwise['peak_live_grad'] / regular['peak_live_grad']:.3f}×; "
            f"target (≤ largest + unhooked = {_mib(target)} MiB): {'met' if ok else 'NOT met'}."
        ),
    ]
    if regular["rss_reset"] and layerwise["rss_reset"]:
        delta = [r["rss_peak"] - r["rss_before"] for r in results]
        lines.append(f"Peak RSS over the step, layer-wise / regular: {delta[1] / delta[0]:.3f}×.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return 0
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional

        def tqdm(items, **_):
            return items

    results = [_run_child(argv, mode) for mode in tqdm(MODES, desc="modes", file=sys.stderr)]
    if args.json:
        print(json.dumps({"args": vars(args), "results": results}, indent=2))
    else:
        print(render(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
