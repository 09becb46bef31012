"""Per-rank optimizer state of GaLore under FSDP2 against one process, on a LLaMA config.

Launches itself under torchrun (gloo on CPU, or NCCL with ``--device cuda``),
shards a LLaMA model with ``fully_shard`` (each decoder layer, then the
root), runs a few GaLoreAdamW steps, and measures on every rank the bytes of
the projection bases, the low-rank moments and the full-rank states
(embeddings, norms, output head). Rank 0 also trains the same model in one
process on the whole batch and reports it as the baseline, plus the largest
parameter difference between the two runs.

    python benchmarks/distributed_state.py                       # llama_60m, rank 128, 2 CPU ranks
    python benchmarks/distributed_state.py --preset llama_130m --rank 256 --nproc 2
    python benchmarks/distributed_state.py --layers 2            # fewer decoder layers: faster

Prints a markdown table (one row per rank plus the one-process baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        default="llama_60m",
        help="shipped LLaMA preset (hf_galore.memory.preset_names())",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="override num_hidden_layers (default: the preset's)",
    )
    parser.add_argument("--rank", type=int, default=128, help="GaLore rank")
    parser.add_argument(
        "--projector", default=None, help="basis finder (default: the package's default projector)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=2,
        help="optimizer steps (the basis is found at step 0)",
    )
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2, help="ranks to launch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the raw numbers as JSON after the table",
    )
    return parser.parse_args(argv)


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this script under torchrun with ``args.nproc`` ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
        "--master_addr=127.0.0.1", f"--master_port={port}", __file__, *argv,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


def build_model(args: argparse.Namespace):
    import torch
    from transformers import LlamaForCausalLM

    from hf_galore.memory import load_preset

    config = load_preset(args.preset)
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def batches(args: argparse.Namespace, vocab: int):
    import torch

    g = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        yield torch.randint(
            0, vocab, (args.batch * args.nproc, args.seq_len), generator=g
        )


def make_optimizer(model, rank: int, projector: str | None = None):
    import hf_galore

    options = {} if projector is None else {"projector": projector}
    config = hf_galore.GaLoreConfig(
        rank=rank, update_proj_gap=200, scale=0.25, target_modules=["attn", "mlp"], **options
    )
    return hf_galore.GaLoreAdamW(hf_galore.galore_param_groups(model, config), lr=1e-3)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from hf_galore.distributed import optimizer_state_bytes

    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        f"cuda:{int(os.environ['LOCAL_RANK'])}" if args.device == "cuda" else "cpu"
    )
    if args.device == "cuda":
        torch.cuda.set_device(device)
    try:
        model = build_model(args).to(device)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = make_optimizer(model, args.rank, args.projector)
        data = list(batches(args, model.config.vocab_size))
        progress = None
        if rank == 0:
            from tqdm.auto import tqdm

            progress = tqdm(
                total=2 * args.steps,
                desc="steps (FSDP2, then one process)",
                file=sys.stderr,
            )
        started = time.perf_counter()
        for ids in data:
            local = ids[rank * args.batch : (rank + 1) * args.batch].to(device)
            opt.zero_grad()
            model(input_ids=local, labels=local).loss.backward()
            opt.step()
            if progress:
                progress.update()
        sharded_seconds = (time.perf_counter() - started) / args.steps
        mine = optimizer_state_bytes(opt)
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            ref = build_model(args).to(device)
            ref_opt = make_optimizer(ref, args.rank, args.projector)
            started = time.perf_counter()
            for ids in data:
                ids = ids.to(device)
                ref_opt.zero_grad()
                # the FSDP loss is a mean per rank, averaged over ranks: the same as one mean here
                ref(input_ids=ids, labels=ids).loss.backward()
                ref_opt.step()
                progress.update()
            one_seconds = (time.perf_counter() - started) / args.steps
            progress.close()
            diff = max(
                (full[n] - p).abs().max().item() for n, p in ref.named_parameters()
            )
            report(
                args,
                gathered,
                optimizer_state_bytes(ref_opt),
                diff,
                sharded_seconds,
                one_seconds,
            )
    finally:
        dist.destroy_process_group()


def report(
    args, per_rank: list[dict], one: dict, diff: float, sharded_s: float, one_s: float
) -> None:
    mib = 1024**2

    def row(name: str, b: dict) -> str:
        cells = [
            f"{b[k] / mib:.2f}"
            for k in ("bases", "lowrank_moments", "full_rank", "total")
        ]
        return (
            f"| {name} | "
            + " | ".join(cells)
            + f" | {b['total'] / one['total']:.3f}× |"
        )

    print(
        f"\nGaLoreAdamW, {args.preset}"
        + (f" ({args.layers} layers)" if args.layers else "")
        + f", rank {args.rank}, attn+mlp projected, fp32, {args.nproc} ranks ({args.device}), "
        f"{args.steps} steps, batch {args.batch}×{args.seq_len} per rank\n"
    )
    print(
        "| run | bases MiB | low-rank moments MiB | full-rank states MiB | total MiB | vs one process |"
    )
    print("|---|---|---|---|---|---|")
    print(row("one process", one))
    for r, b in enumerate(per_rank):
        print(row(f"FSDP2 rank {r}", b))
    print(
        f"\nmax |param difference| FSDP2 vs one process after {args.steps} steps: {diff:.2e}"
    )
    print(
        f"step time: FSDP2 {sharded_s:.3f} s/step, one process {one_s:.3f} s/step (same hardware, shared cores)"
    )
    if args.json:
        print(
            json.dumps(
                {"one_process": one, "per_rank": per_rank, "max_param_diff": diff}
            )
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        return launch(args, argv)
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
